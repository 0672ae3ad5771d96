"""The TokLIP trunk: VQ codes -> MLP -> causal ViT blocks -> per-token features -> MAP pool.

Its state-dict keys (`vq.*`, `vq_table`, `vq_mapping`, `pos_embed`, `blocks.i.*`, `norm`, `attn_pool.*`)
are those of the release's `visual.trunk`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, Mlp, get_act_layer, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..tokenizers import VQTokenizer
from .backbones import BackboneSpec

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)
_GELUTanh = get_act_layer("gelu_tanh")
KeysValues = tuple[torch.Tensor, torch.Tensor]  # a block's keys and values, (B, heads, tokens, head width) each


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token i attends to tokens 0..i (raster order).

    Causality is `is_causal=True` inside SDPA, not a mask passed from outside, so it holds under
    gradient checkpointing too and keeps the flash kernels.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def extend(self, x: torch.Tensor, past: KeysValues | None) -> tuple[torch.Tensor, KeysValues]:
        """Attention of new tokens x (B, n, D) that follow the `past` keys and values (or start the
        sequence): each attends to the past and to the new tokens up to itself. Returns the output and
        the keys and values of the whole sequence so far."""
        q, k, v = self._heads(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        new, total = q.shape[2], k.shape[2]
        # One new token sees everything; n new tokens see the past and a causal n x n corner.
        mask = None if new == 1 else torch.ones(new, total, dtype=torch.bool, device=x.device).tril(total - new)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), (k, v)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, width = x.shape
        return self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class CausalBlock(nn.Module):
    """Pre-norm transformer block with timm's key names (norm1, attn.qkv/proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(spec.width)
        self.attn = CausalSelfAttention(spec.width, spec.heads)
        self.norm2 = _LayerNorm(spec.width)
        self.mlp = Mlp(spec.width, spec.mlp_hidden, act_layer=_GELUTanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def extend(self, x: torch.Tensor, past: KeysValues | None) -> tuple[torch.Tensor, KeysValues]:
        """`forward` for new tokens after a cached past (see `CausalSelfAttention.extend`)."""
        attended, keys_values = self.attn.extend(self.norm1(x), past)
        x = x + attended
        return x + self.mlp(self.norm2(x)), keys_values


@dataclass
class CausalCache:
    """The keys and values of every block for the tokens encoded so far: with it, `TokenEncoder.extend`
    costs one token's work a new token, not a pass over the whole prefix."""

    blocks: list[KeysValues] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens encoded so far."""
        return self.blocks[0][0].shape[2] if self.blocks else 0


class TokenEncoder(nn.Module):
    """Frozen VQ tokenizer + trainable causal ViT over its codes."""

    def __init__(self, vq: VQTokenizer, spec: BackboneSpec, grid: tuple[int, int]) -> None:
        super().__init__()
        self.vq = vq
        self.spec = spec
        self.grid = grid
        width = spec.width
        self.vq_table = nn.Linear(vq.code_dim, 4 * width)
        self.vq_act = nn.GELU()  # exact (erf) GELU, as released
        self.vq_mapping = nn.Linear(4 * width, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        self.blocks = nn.ModuleList(CausalBlock(spec) for _ in range(spec.depth))
        self.norm = _LayerNorm(width)
        self.attn_pool = AttentionPoolLatent(
            width, num_heads=spec.heads, mlp_ratio=spec.mlp_ratio, norm_layer=_LayerNorm, act_layer=_GELUTanh
        )
        self.gradient_checkpointing = False
        self._init_trunk()

    def _init_trunk(self) -> None:
        # timm's ViT init for the trunk; vq_table / vq_mapping keep PyTorch's default Linear init.
        trunc_normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.attn_pool.init_weights()

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[1]

    def features_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w, C) -> causal per-token features (B, h*w, D) after the final norm."""
        if tuple(codes.shape[1:3]) != self.grid:
            raise ValueError(
                f"token grid {tuple(codes.shape[1:3])} does not match the model's {self.grid} "
                f"(images of {self.grid[0] * self.vq.downsample}x{self.grid[1] * self.vq.downsample} px)"
            )
        x = self._embed(codes.flatten(1, 2), start=0)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def extend(self, codes: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Codes (B, n, C) of the next n tokens in raster order -> their features (B, n, D), equal to
        those of `features_from_codes` over the whole sequence (the trunk is causal); `cache` grows by
        n. What an autoregressive generator reads as it samples, a token at a time."""
        start = cache.length
        if start + codes.shape[1] > self.num_tokens:
            raise ValueError(f"{start} + {codes.shape[1]} tokens exceed the model's {self.num_tokens} ({self.grid[0]}x{self.grid[1]})")
        x = self._embed(codes, start)
        pasts = cache.blocks or [None] * len(self.blocks)
        for index, (block, past) in enumerate(zip(self.blocks, pasts)):
            x, keys_values = block.extend(x, past)
            pasts[index] = keys_values
        cache.blocks = pasts
        return self.norm(x)

    def _embed(self, codes: torch.Tensor, start: int) -> torch.Tensor:
        """Codes (B, n, C) of the tokens at positions start.. -> the first block's input (B, n, D)."""
        x = self.vq_mapping(self.vq_act(self.vq_table(codes.to(self.vq_table.weight.dtype))))
        return x + self.pos_embed[:, start : start + codes.shape[1]]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """MAP pooling over all tokens (unmasked): (B, N, D) -> (B, D)."""
        return self.attn_pool(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features_from_codes(self.vq.encode(images).codes))
