"""Convolutional building blocks shared by the LlamaGen and taming VQ families.

Both families use the same maths (GroupNorm(32, eps 1e-6; fewer or none only in miniatures), swish, single-head spatial attention,
right/bottom-padded stride-2 downsampling, nearest upsampling); only the containers that hold these
blocks, and so the state-dict key names, differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.Module:
    """GroupNorm; `groups=0` leaves activations unnormalised (an identity, no weights)."""
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The operation order (scale after the product, explicit softmax) is the release's, so that
        # codes and indices match it bit for bit; it only runs at the lowest resolution, so it is cheap.
        b, c, h, w = x.shape
        normed = self.norm(x)
        q = self.q(normed).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(normed).reshape(b, c, h * w)
        v = self.v(normed).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the right and bottom (the release's layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
