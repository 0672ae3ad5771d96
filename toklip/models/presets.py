"""Named model presets: the parts (tokenizer, backbone, resolution, text tower, teacher) that a
`preset/` Hydra config picks. The configs are the one source; this module reads them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from ..config import compose_config, config_group_options
from ..tokenizers import register_configured_tokenizer


@dataclass(frozen=True)
class Preset:
    tokenizer: str  # a registered tokenizer name
    backbone: str  # a BACKBONES name
    image_size: int
    text: str  # a TEXT_TOWERS name
    teacher: str | None  # open_clip model name of the teacher (and of the text tower's source)


def available_presets() -> list[str]:
    """The names `preset(...)`, `toklip.build_toklip(...)` and `toklip-train preset=...` accept."""
    return sorted(config_group_options("preset"))


@functools.cache
def preset(name: str) -> Preset:
    """The parts of a preset, composed from its `preset/<name>` config."""
    try:
        cfg = compose_config("architecture", [f"preset={name}"])
    except MissingConfigException:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(available_presets())}") from None
    return preset_from_config(cfg)


def preset_from_config(cfg: DictConfig) -> Preset:
    """The parts a composed config picks: its tokenizer, backbone, text and teacher groups and resolution
    (a tokenizer given by `_target_` is registered under its name)."""
    tokenizer = register_configured_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True))
    return Preset(tokenizer["name"], cfg.backbone.name, cfg.resolution, cfg.text.name, cfg.teacher.model)


# The reference code's model names, for `build_toklip_encoder` compatibility.
REFERENCE_MODEL_NAMES = {
    "ViT-SO400M-16-SigLIP2-256-toklip": "toklip_s_256",
    "ViT-SO400M-16-SigLIP2-384-toklip": "toklip_l_384",
}
