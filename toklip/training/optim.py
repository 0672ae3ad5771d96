"""AdamW parameter groups and the warmup + cosine schedule, as the release computes them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

# timm's rule also exempts these (by name) from weight decay, besides every tensor of ndim <= 1.
TIMM_NO_DECAY_NAMES = ("visual.trunk.pos_embed", "visual.trunk.attn_pool.latent", "logit_scale", "logit_bias")


def release_excludes_decay(name: str, param: torch.Tensor) -> bool:
    """The release's rule: no decay for ndim < 2 or names containing bn, ln, bias or logit_scale
    (so pos_embed and the pool's latent ARE decayed)."""
    return param.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


def timm_excludes_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in TIMM_NO_DECAY_NAMES


NO_DECAY_RULES = {"release": release_excludes_decay, "timm": timm_excludes_decay}


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, rule: str = "release") -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed, and not decayed by `rule`."""
    if rule not in NO_DECAY_RULES:
        raise ValueError(f"weight-decay rule {rule!r}: choose from {sorted(NO_DECAY_RULES)}")
    excluded = NO_DECAY_RULES[rule]
    decay, no_decay = [], []
    for name, param in named:
        if param.requires_grad:
            (no_decay if excluded(name, param) else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """The release's lr factor for step s: (s + 1) / warmup during warmup, then a cosine to 0."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total steps ({total_steps}) must exceed the warmup ({warmup_steps})")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_adamw(
    named: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    betas: Sequence[float],
    eps: float,
    weight_decay: float,
    rule: str = "release",
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(named, weight_decay, rule), lr=lr, betas=tuple(betas), eps=eps)


def adamw_warmup_cosine(module: Any, named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Any]:
    """`configure_optimizers` of a LightningModule whose hparams hold lr, betas, eps, weight_decay,
    no_decay_rule, warmup_steps and total_steps (None: the Trainer's estimate)."""
    hp = module.hparams
    optimizer = build_adamw(named, hp.lr, hp.betas, hp.eps, hp.weight_decay, hp.no_decay_rule)
    total = hp.total_steps or int(module.trainer.estimated_stepping_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(hp.warmup_steps, total - 1), total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
