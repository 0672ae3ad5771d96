"""taming-transformers VQGAN tokenizers, loaded into the shared layout by renaming their keys."""

from __future__ import annotations

import re

from ..checkpoints import StateDict
from .conv_vq import ConvVQConfig, ConvVQFactory, ConvVQModel
from .registry import register_tokenizer

_MIDDLE = {"block_1": "0", "attn_1": "1", "block_2": "2"}


def taming_to_llamagen_keys(state_dict: StateDict, levels: int) -> tuple[StateDict, list[str]]:
    """Rename taming's `down/up.{level}.block/attn` and `mid.block_1` keys to the LlamaGen layout.

    taming numbers decoder levels from the highest resolution, LlamaGen from the lowest. The
    `loss.*` keys (discriminator, LPIPS) are dropped and returned as ignored. Keys already in the
    LlamaGen layout (a toklip export) pass unchanged.
    """
    converted: StateDict = {}
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith("loss."):
            ignored.append(key)
            continue
        key = re.sub(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.", lambda m: f"{m[1]}.mid.{_MIDDLE[m[2]]}.", key)
        key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", key)
        key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", key)
        key = re.sub(
            r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.",
            lambda m: f"decoder.conv_blocks.{levels - 1 - int(m[1])}.{'res' if m[2] == 'block' else m[2]}.",
            key,
        )
        converted[key] = tensor
    return converted, ignored


class TamingVQ(ConvVQModel):
    """A VQGAN of taming-transformers' architecture, read from its Lightning checkpoints."""

    def convert_state_dict(self, state_dict: StateDict) -> tuple[StateDict, list[str]]:
        return taming_to_llamagen_keys(state_dict, len(self.config.channel_mult))


def taming_config(codebook_size: int, code_dim: int, channel_mult: tuple[int, ...], z_channels: int, **sizes) -> ConvVQConfig:
    """taming's VQGAN sizes: plain (not unit-norm) codes and no usage buffer."""
    return ConvVQConfig(
        codebook_size=codebook_size,
        code_dim=code_dim,
        l2_normalized=False,
        track_usage=False,
        channel_mult=channel_mult,
        z_channels=z_channels,
        **sizes,
    )


_F16, _F8 = (1, 1, 2, 2, 4), (1, 2, 2, 4)
for _name, _config in {
    "taming_f16_16384": taming_config(16384, 256, _F16, 256),
    "taming_f16_1024": taming_config(1024, 256, _F16, 256),
    "taming_f8_16384": taming_config(16384, 4, _F8, 4),
    "taming_f8_256": taming_config(256, 4, _F8, 4),
    "taming_tiny": taming_config(256, 32, (1, 1, 2, 2), 64, base_channels=32, encoder_res_blocks=1),
}.items():
    register_tokenizer(ConvVQFactory(TamingVQ, _config), name=_name)
