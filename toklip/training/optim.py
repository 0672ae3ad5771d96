"""AdamW parameter groups and the warmup + cosine schedule, as the release computes them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
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


@dataclass  # not frozen: Hydra composes configs into it
class AdamWCosine:
    """AdamW over two weight-decay groups, then linear warmup and a cosine to 0: the release's recipe.

    The one definition of the optimiser settings: the `optim/release` config is this class (so a key
    it lacks, or a value of the wrong type, is an error at composition), and every training module
    takes the `optim` group's keys and calls `configure`.
    """

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.1
    no_decay_rule: str = "release"  # or timm
    warmup_steps: int = 782
    total_steps: int | None = None  # None: the Trainer's estimate (max_steps, or epochs x steps per epoch)

    def configure(self, module: L.LightningModule, named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Any]:
        """What a LightningModule's `configure_optimizers` returns: the optimizer and its per-step schedule."""
        groups = param_groups(named, self.weight_decay, self.no_decay_rule)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps)
        total = self.total_steps or int(module.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(self.warmup_steps, total - 1), total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


ConfigStore.instance().store(group="optim", name="release", node=AdamWCosine)
