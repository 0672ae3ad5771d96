"""Fit the student's fresh token embedding to the teacher's patch embedding (an optional warm start).

Initialised from the teacher, the student copies every block but its input MLP (`vq_table`, GELU,
`vq_mapping`), which starts random: the copied blocks then see inputs unlike anything they were
trained on, and a short run spends itself re-learning them. Where the VQ grid equals the teacher's
patch grid (VQ-16 and patch 16 at 256 px; the miniature's 8x8), each token has a teacher patch, and
`vq_mapping` can be solved by ridge regression so that the token embeddings reproduce the teacher's
patch embeddings. `vq_table` keeps its random init (random GELU features of the codes).
"""

from __future__ import annotations

import torch
from torch import nn

from .teacher import Teacher
from .token_encoder import TokenEncoder


@torch.no_grad()
def token_embedding_statistics(trunk: TokenEncoder, teacher: Teacher, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sufficient statistics of the regression on one batch (summable over batches and ranks)."""
    patch_embed = getattr(getattr(teacher.visual, "trunk", None), "patch_embed", None)
    if patch_embed is None:
        raise ValueError("input alignment needs a teacher with a timm ViT trunk (open_clip's TimmModel)")
    if tuple(patch_embed.grid_size) != tuple(trunk.grid) or patch_embed.proj.out_channels != trunk.spec.width:
        raise ValueError(
            f"input alignment needs the teacher's patch grid to be the VQ grid: teacher {tuple(patch_embed.grid_size)} "
            f"x width {patch_embed.proj.out_channels}, student {tuple(trunk.grid)} x width {trunk.spec.width}"
        )
    target = patch_embed(teacher.resize(images))  # (B, N, D): the teacher's embedding before its position embedding
    features = trunk.vq_act(trunk.vq_table(trunk.vq.encode(images).codes.flatten(0, 2).to(trunk.vq_table.weight.dtype)))
    # float64: codes repeat (backgrounds), so the Gram matrix is near-singular
    features = torch.cat([features, torch.ones_like(features[:, :1])], dim=1).double()  # the bias column
    target = target.flatten(0, 1).double()
    return {
        "gram": features.T @ features,
        "cross": features.T @ target,
        "target_sq": target.pow(2).sum(0),
        "target_sum": target.sum(0),
        "count": torch.tensor(float(target.shape[0]), dtype=torch.float64, device=target.device),
    }


@torch.no_grad()
def solve_token_embedding(trunk: TokenEncoder, stats: dict[str, torch.Tensor], ridge: float = 1e-3) -> float:
    """Set `vq_mapping` to the ridge solution; returns the fit's R^2 on the statistics' data."""
    gram, cross = stats["gram"], stats["cross"]
    damping = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + damping, cross)  # (features + 1, D)
    mapping: nn.Linear = trunk.vq_mapping
    mapping.weight.copy_(solution[:-1].T.to(mapping.weight.dtype))
    mapping.bias.copy_(solution[-1].to(mapping.bias.dtype))
    # |Y - HW|^2 = |Y|^2 - 2 tr(W^T H^T Y) + tr(W^T H^T H W), all from the statistics
    residual = stats["target_sq"].sum() - 2 * (solution * cross).sum() + (solution * (gram @ solution)).sum()
    total = stats["target_sq"].sum() - stats["target_sum"].pow(2).sum() / stats["count"]
    return float(1 - residual / total)
