"""Named model presets: a tokenizer, a backbone, a resolution, a text tower and a teacher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backbones import BACKBONES
from .text import text_config


@dataclass(frozen=True)
class Preset:
    tokenizer: str
    backbone: str
    image_size: int
    text: str
    teacher: str | None  # open_clip model name of the teacher (and of the text tower's source)


PRESETS: dict[str, Preset] = {
    "toklip_s_256": Preset("llamagen_vq16", "so400m", 256, "siglip2_so400m", "ViT-SO400M-16-SigLIP2-256"),
    "toklip_l_384": Preset("llamagen_vq16", "so400m", 384, "siglip2_so400m", "ViT-SO400M-16-SigLIP2-384"),
    "toklip_so400m_512": Preset("llamagen_vq16", "so400m", 512, "siglip2_so400m", "ViT-SO400M-16-SigLIP2-512"),
    "tiny_64": Preset("llamagen_tiny", "tiny", 64, "tiny", "tiny_teacher_64"),
    "tiny_32": Preset("llamagen_tiny_f4", "tiny", 32, "tiny", "tiny_teacher_32"),  # the CPU miniature
}

# The reference code's model names, for `build_toklip_encoder` compatibility.
REFERENCE_MODEL_NAMES = {
    "ViT-SO400M-16-SigLIP2-256-toklip": "toklip_s_256",
    "ViT-SO400M-16-SigLIP2-384-toklip": "toklip_l_384",
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None


def _tiny_teacher(image_size: int, timm_model_name: str) -> dict[str, Any]:
    """A small open_clip CLIP whose vision trunk has the `tiny` backbone's keys."""
    return {
        "embed_dim": BACKBONES["tiny"].width,
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": text_config("tiny"),
    }


# open_clip configs that toklip defines itself (small teachers for tests and the CPU miniature).
OPEN_CLIP_CONFIGS = {
    "tiny_teacher_64": lambda: _tiny_teacher(64, "vit_tiny_patch8_siglip_64"),
    "tiny_teacher_32": lambda: _tiny_teacher(32, "vit_tiny_patch4_siglip_32"),
}
