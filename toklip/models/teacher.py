"""The frozen teacher (any open_clip model) and student initialisation from it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    CheckpointError,
    StateDict,
    describe_source,
    find_state_dict,
    load_state_dict_strict,
    read_checkpoint,
    strip_prefix,
)
from .backbones import BACKBONES
from .text import text_config
from .toklip import TOKENIZER_PREFIX

log = logging.getLogger(__name__)

# File names open_clip uses for weights on the Hugging Face hub, safest first.
_HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


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
    "tiny_teacher_64": lambda: _tiny_teacher(64, "toklip_vit_tiny_patch8_siglip_64"),
    "tiny_teacher_32": lambda: _tiny_teacher(32, "toklip_vit_tiny_patch4_siglip_32"),
}


def open_clip_config(model: str | Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's config dict for a model name (toklip's own names first), or a config given directly."""
    if isinstance(model, str) and model in OPEN_CLIP_CONFIGS:
        return OPEN_CLIP_CONFIGS[model]()
    if isinstance(model, str):
        config = open_clip.get_model_config(model)
        if config is None:
            raise KeyError(f"open_clip knows no model named {model!r}")
        return dict(config)
    return dict(model)


def build_open_clip(model: str | Mapping[str, Any]) -> nn.Module:
    """A randomly initialised open_clip model (never downloads: weights are loaded separately)."""
    config = open_clip_config(model)
    config.pop("custom_text", None)
    return open_clip.CustomTextCLIP(**config)


def find_teacher_weights(
    model: str,
    pretrained: str | os.PathLike | None,
    *,
    source: str = "teacher.pretrained",
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The weights file: `pretrained` when given, else the model's file in the existing HF cache
    (`cache_dir`, default the hub's own)."""
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise CheckpointError(f"teacher weights not found: {describe_source(path, source)}")
        return path
    from huggingface_hub import try_to_load_from_cache

    for tag_cfg in (open_clip.get_pretrained_cfg(model, tag) for tag in open_clip.list_pretrained_tags_by_model(model)):
        repo = (tag_cfg or {}).get("hf_hub", "").strip("/")
        for filename in _HUB_WEIGHT_FILES if repo else ():
            cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            if isinstance(cached, str):
                return Path(cached)
    raise CheckpointError(
        f"no weights for teacher {model!r}: set {source} to a local open_clip weights file "
        f"({' or '.join(_HUB_WEIGHT_FILES)}); the Hugging Face cache has none and nothing is downloaded"
    )


def read_open_clip_state_dict(path: str | os.PathLike, *, source: str | None = None) -> StateDict:
    raw = read_checkpoint(path, source=source)
    return strip_prefix(find_state_dict(raw, ("state_dict",), where=str(path)), "module.")


def teacher_state_dict(model: str, checkpoint: str | os.PathLike | None, *, source: str) -> StateDict:
    """The open_clip weights of a teacher: from `checkpoint`, or its file in the existing HF cache.
    `source` names the config key the path came from, for error messages."""
    return read_open_clip_state_dict(find_teacher_weights(model, checkpoint, source=source), source=source)


def load_open_clip(model: str | Mapping[str, Any], state_dict: StateDict, *, where: str = "teacher") -> nn.Module:
    """An open_clip model with `state_dict` loaded strictly."""
    clip = build_open_clip(model)
    load_state_dict_strict(clip, state_dict, where=where)
    return clip


class Teacher(nn.Module):
    """The frozen vision tower of an open_clip model; gives only the image embedding.

    Inputs are the student's normalised images; they are resized bilinearly when the teacher's
    resolution differs from theirs.
    """

    def __init__(self, model: str | Mapping[str, Any], state_dict: StateDict | None = None, *, where: str = "teacher") -> None:
        super().__init__()
        clip = build_open_clip(model) if state_dict is None else load_open_clip(model, state_dict, where=where)
        self.visual = clip.visual
        self.image_size = tuple(clip.visual.image_size)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the teacher's own input size (bilinear), unchanged when they already are."""
        if tuple(images.shape[-2:]) == self.image_size:
            return images
        return F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, return_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The image embedding; with `return_tokens`, also the trunk's patch tokens (timm trunks)."""
        if not return_tokens:
            return self.visual(self.resize(images))
        tokens = self.patch_tokens(images)
        return self.visual.head(self.visual.trunk.forward_head(tokens)), tokens

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's output tokens (timm trunks). Gradients reach `images`: a perceptual loss may use them."""
        trunk = getattr(self.visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "forward_features"):
            raise ValueError("patch tokens need a teacher with a timm trunk (open_clip's TimmModel)")
        return trunk.forward_features(self.resize(images))


@dataclass
class InitReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (teacher key, why)
    left_at_init: list[str] = field(default_factory=list)  # student keys the teacher did not provide

    def __str__(self) -> str:
        skipped = ", ".join(f"{k} ({why})" for k, why in self.skipped[:8])
        return (
            f"copied {len(self.copied)} tensors from the teacher; skipped {len(self.skipped)}"
            f"{': ' + skipped if skipped else ''}{' ...' if len(self.skipped) > 8 else ''}; "
            f"left at init {len(self.left_at_init)}: {', '.join(self.left_at_init[:8])}"
        )


def init_from_teacher(student: nn.Module, teacher_state: Mapping[str, torch.Tensor]) -> InitReport:
    """Copy every teacher tensor whose name and shape match a student tensor (the paper's init).

    The VQ is never touched (it comes from its own checkpoint). Fails when no transformer block was
    copied: the teacher's backbone does not match the student's.
    """
    own = {k: v for k, v in student.state_dict().items() if not k.startswith(TOKENIZER_PREFIX)}
    report = InitReport()
    to_copy = {}
    for key, tensor in teacher_state.items():
        if key not in own:
            report.skipped.append((key, "not in the student"))
        elif own[key].shape != tensor.shape:
            report.skipped.append((key, f"shape {tuple(tensor.shape)} vs student {tuple(own[key].shape)}"))
        else:
            to_copy[key] = tensor
    if not any(k.startswith("visual.trunk.blocks.") for k in to_copy):
        raise CheckpointError(f"no transformer block could be copied from the teacher: backbone mismatch? {report}")
    with torch.no_grad():
        for key, tensor in to_copy.items():
            own[key].copy_(tensor)
    report.copied = sorted(to_copy)
    report.left_at_init = sorted(set(own) - set(to_copy))
    log.info("student initialised from teacher: %s", report)
    return report
