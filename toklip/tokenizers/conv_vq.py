"""The convolutional VQ autoencoder of LlamaGen (and, with other sizes, of taming-transformers' VQGAN).

State-dict layout: `encoder.*`, `decoder.*`, `quantize.embedding.weight` (+ `quantize.codebook_used`
where the family tracks usage), `quant_conv.*`, `post_quant_conv.*`, exactly as LlamaGen's
`vq_model.py` names them. Attention blocks sit at the lowest resolution only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import VQTokenizer
from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, swish


@dataclass(frozen=True)
class ConvVQConfig:
    codebook_size: int = 16384
    code_dim: int = 8
    l2_normalized: bool = True  # LlamaGen searches with unit-norm codes; taming does not
    track_usage: bool = True  # LlamaGen checkpoints carry a `quantize.codebook_used` buffer
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    encoder_res_blocks: int = 2  # the decoder uses one more per level
    z_channels: int = 256
    norm_groups: int = 32  # GroupNorm's groups (the released families: 32); 0 for none

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class _Stage(nn.Module):
    """One resolution level: residual blocks, attention after each (lowest level only), a resampler."""

    def __init__(self, blocks: list[ResnetBlock], with_attention: bool, groups: int) -> None:
        super().__init__()
        self.res = nn.ModuleList(blocks)
        channels = blocks[-1].conv2.out_channels
        self.attn = nn.ModuleList(AttnBlock(channels, groups) for _ in blocks) if with_attention else nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _middle(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups), AttnBlock(channels, groups), ResnetBlock(channels, channels, groups)])


class Encoder(nn.Module):
    def __init__(self, config: ConvVQConfig) -> None:
        super().__init__()
        ch, mult, groups = config.base_channels, config.channel_mult, config.norm_groups
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            block_out = ch * m
            blocks = [ResnetBlock(block_in if i == 0 else block_out, block_out, groups) for i in range(config.encoder_res_blocks)]
            stage = _Stage(blocks, with_attention=level == len(mult) - 1, groups=groups)
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_out)
            self.conv_blocks.append(stage)
            block_in = block_out
        self.mid = _middle(block_in, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder, lowest resolution first: `conv_blocks.0` is the level with attention."""

    def __init__(self, config: ConvVQConfig) -> None:
        super().__init__()
        ch, mult, groups = config.base_channels, config.channel_mult, config.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in, groups)
        self.conv_blocks = nn.ModuleList()
        for position, level in enumerate(reversed(range(len(mult)))):
            block_out = ch * mult[level]
            blocks = [ResnetBlock(block_in if i == 0 else block_out, block_out, groups) for i in range(config.encoder_res_blocks + 1)]
            stage = _Stage(blocks, with_attention=position == 0, groups=groups)
            if level != 0:
                stage.upsample = Upsample(block_out)
            self.conv_blocks.append(stage)
            block_in = block_out
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for stage in self.conv_blocks:
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """Holds the codebook (`quantize.embedding`); the search itself lives in `VQTokenizer.encode`."""

    def __init__(self, config: ConvVQConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size)
        if config.l2_normalized:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if config.track_usage:
            # Fixed at 65536 in LlamaGen whatever the codebook size; kept so checkpoints load strictly.
            self.register_buffer("codebook_used", torch.zeros(65536))


class ConvVQModel(VQTokenizer):
    """A frozen convolutional VQ tokenizer (LlamaGen layout)."""

    def __init__(self, config: ConvVQConfig) -> None:
        super().__init__(config.codebook_size, config.code_dim, config.downsample, config.l2_normalized)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Quantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self._freeze()

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    def codebook(self) -> torch.Tensor:
        weight = self.quantize.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_normalized else weight

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(codes))

    def trainable_codebook(self) -> nn.Parameter:
        return self.quantize.embedding.weight


@dataclass(frozen=True)
class ConvVQFactory:
    """The registry's factory for one member of a conv-VQ family: options replace fields of `config`."""

    model: type[ConvVQModel]
    config: ConvVQConfig

    def __call__(self, **overrides: Any) -> ConvVQModel:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(ConvVQConfig)}
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; a {self.model.__name__} takes the fields of ConvVQConfig")
        return self.model(dataclasses.replace(self.config, **overrides))
