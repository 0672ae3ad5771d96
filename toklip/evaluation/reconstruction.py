"""How well a VQ tokenizer reconstructs images: PSNR, codebook usage and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..tokenizers import VQTokenizer


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), computed per image then averaged."""
    mse = (reconstruction.clamp(-1, 1) - images).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def codebook_perplexity(indices: torch.Tensor, codebook_size: int) -> float:
    """exp(entropy) of code frequencies: the effective number of codes in use."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    p = counts[counts > 0] / counts.sum()
    return math.exp(float(-(p * p.log()).sum()))


@torch.no_grad()
def reconstruction_scores(tokenizer: VQTokenizer, images: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Over batches of images in [-1, 1]: mean PSNR of decode(encode(image)), codebook usage and
    perplexity, and the first batch with its reconstruction (`examples`)."""
    total_psnr, count, indices, first = 0.0, 0, [], None
    for batch in images:
        codes = tokenizer.encode(batch).indices
        reconstruction = tokenizer.decode(codes)
        total_psnr += float(psnr(reconstruction, batch)) * len(batch)
        count += len(batch)
        indices.append(codes.flatten())
        first = (batch, reconstruction) if first is None else first
    if count == 0:
        raise ValueError("reconstruction_scores: no images")
    used = torch.cat(indices)
    return {
        "psnr": total_psnr / count,
        "codebook_usage": torch.unique(used).numel() / tokenizer.codebook_size,
        "codebook_perplexity": codebook_perplexity(used, tokenizer.codebook_size),
        "examples": first,
    }
