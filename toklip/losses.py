"""Losses: softmax CLIP and sigmoid SigLIP contrastive losses with negatives from all ranks, and
distillation from a teacher's image embedding (and, optionally, its patch tokens).

Gradients across ranks. DDP averages the gradients of the ranks. With `gather_with_grad`, the
all-gather passes gradients back to the rank that owns each feature, and DDP's average equals the
gradient of one process over the global batch. Without it (the reference's default), every rank
computes the same global loss but only its own features carry gradient, so the average is
1/world of the global gradient for every feature-side weight; `match_single_process=True` (default)
multiplies the features' gradient by the world size so both modes train the same. The reference did not, which makes its distillation
term relatively `world` times stronger than its formula says; `match_single_process=False` keeps that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from torch import nn

from .distributed import rank_and_world

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's bound: logit_scale is clamped to [0, ln 100]


@torch.no_grad()
def clamp_logit_scale_(logit_scale: torch.Tensor) -> None:
    """In place, after every optimizer step (the release's rule)."""
    logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' features, concatenated in rank order; the local slice keeps its gradient."""
    rank, world = rank_and_world()
    if world == 1:
        return features
    if with_grad:
        return torch.cat(dist_fn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The same value, `factor` times the gradient."""
    return x if factor == 1 else x.detach() + factor * (x - x.detach())


class ClipLoss(nn.Module):
    """Softmax contrastive loss (the release's): mean of image->text and text->image cross-entropy
    over logits = scale * image @ text.T, on L2-normalised features.

    `local_loss`: each rank scores only its own rows against all columns (cheaper; with
    `gather_with_grad` the gradients still equal the global loss's).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, match_single_process: bool = True) -> None:
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError("local_loss needs gather_with_grad: without it the other ranks' share of the gradient is lost")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.match_single_process = match_single_process

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        if not self.gather_with_grad and self.match_single_process:
            # Features only: logit_scale enters every rank's (identical) loss whole, its gradient is complete.
            image, text = _scale_gradient(image, world), _scale_gradient(text, world)
        all_image = gather_features(image, self.gather_with_grad)
        all_text = gather_features(text, self.gather_with_grad)
        if self.local_loss:
            per_image, per_text = logit_scale * image @ all_text.T, logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        else:
            per_image = logit_scale * all_image @ all_text.T
            per_text = per_image.T
            labels = torch.arange(all_image.shape[0], device=image.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss: -mean over local images of sum over all texts of log sigmoid(label * logit),
    logit = scale * image @ text.T + bias, label +1 for a pair and -1 otherwise. Texts are gathered
    from every rank with their gradients."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        rank, _ = rank_and_world()
        all_text = gather_features(text, with_grad=True)
        logits = logit_scale * image @ all_text.T + logit_bias
        labels = -torch.ones_like(logits)
        local = torch.arange(image.shape[0], device=image.device)
        labels[local, local + rank * image.shape[0]] = 1
        return -F.logsigmoid(labels * logits).sum() / image.shape[0]


class DistillLoss(nn.Module):
    """weight x MSE between L2-normalised student and teacher embeddings (release: 1000, mean over
    B x D elements), or weight x mean(1 - cosine); plus token_weight x MSE of per-token features
    against the teacher's patch tokens (the release's unused token term, weight 10)."""

    def __init__(self, weight: float = 1000.0, form: str = "mse", token_weight: float = 0.0) -> None:
        super().__init__()
        if form not in ("mse", "cosine"):
            raise ValueError(f"distillation form {form!r}: choose mse or cosine")
        self.weight, self.form, self.token_weight = weight, form, token_weight

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        student_tokens: torch.Tensor | None = None,
        teacher_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1)
        if self.form == "mse":
            term = F.mse_loss(student, teacher)
        else:
            term = (1 - (student * teacher).sum(-1)).mean()
        losses = {"distill": self.weight * term}
        if self.token_weight:
            if student_tokens is None or teacher_tokens is None:
                raise ValueError("token distillation needs the student's and the teacher's per-token features")
            if student_tokens.shape != teacher_tokens.shape:
                raise ValueError(f"student tokens {tuple(student_tokens.shape)} vs teacher tokens {tuple(teacher_tokens.shape)}")
            losses["token_distill"] = self.token_weight * F.mse_loss(student_tokens, teacher_tokens.detach())
        return losses


@dataclass  # not frozen: Hydra composes configs into it
class LossSettings:
    """The loss of a TokLIP run: the `loss/` config group (`loss/release` is this class, the release's
    softmax CLIP + 1000 x MSE of normalised image embeddings)."""

    contrastive: str = "clip"  # clip (the release's softmax loss) or siglip (sigmoid, with a logit bias)
    local_loss: bool = False
    gather_with_grad: bool = False
    match_single_process: bool = True  # false: the reference's DDP gradient scale (features 1/world)
    distill_weight: float = 1000.0
    distill_form: str = "mse"  # or cosine
    token_distill_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.contrastive not in ("clip", "siglip"):
            raise ValueError(f"loss.contrastive={self.contrastive!r}: choose clip (the release's softmax loss) or siglip")

    def contrastive_loss(self) -> ClipLoss | SigLipLoss:
        if self.contrastive == "siglip":
            return SigLipLoss()
        return ClipLoss(self.local_loss, self.gather_with_grad, self.match_single_process)


ConfigStore.instance().store(group="loss", name="release", node=LossSettings)
