"""LlamaGen VQ tokenizers (VQ-16 is the one TokLIP uses): unit-norm 8-d codes."""

from __future__ import annotations

import argparse

from .conv_vq import ConvVQConfig, ConvVQFactory, ConvVQModel
from .registry import register_tokenizer


class LlamaGenVQ(ConvVQModel):
    """LlamaGen's layout is the shared one; its training checkpoints may keep the run's argparse.Namespace."""

    checkpoint_globals = (argparse.Namespace,)


for _name, _config in {
    "llamagen_vq16": ConvVQConfig(),
    "llamagen_vq8": ConvVQConfig(channel_mult=(1, 2, 2, 4)),
    # Small widths for tests and the CPU miniature: downsample 8, so a 64 px image is 8x8 tokens.
    "llamagen_tiny": ConvVQConfig(codebook_size=1024, base_channels=32, channel_mult=(1, 1, 2, 2), encoder_res_blocks=1, z_channels=64),
    # The CPU miniature's: downsample 4 (a 32 px image is 8x8 tokens), 16 base channels, 32-d codes and
    # 4096 of them. No GroupNorm: its per-image statistics, taken mostly over the background, wash out
    # the shapes' absolute colours (after 500 steps, 22.7 dB and 21% of shapes' colours recovered with
    # 4 groups; 25.7 dB and 45% without).
    "llamagen_tiny_f4": ConvVQConfig(
        codebook_size=4096, base_channels=16, channel_mult=(1, 2, 2), encoder_res_blocks=1, z_channels=64, norm_groups=0, code_dim=32
    ),
}.items():
    register_tokenizer(ConvVQFactory(LlamaGenVQ, _config), name=_name)
