"""Build TokLIP models by preset, and load released or toklip-made weights into them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import (
    NUMPY_SCALARS,
    StateDict,
    compare_state_dict,
    find_state_dict,
    load_state_dict_strict,
    read_checkpoint,
    read_sidecar,
    save_with_sidecar,
    strip_prefix,
)
from ..tokenizers import CodebookLookup, build_tokenizer
from .backbones import backbone_spec
from .presets import REFERENCE_MODEL_NAMES, Preset
from .presets import preset as preset_of
from .teacher import build_open_clip, find_teacher_weights, read_open_clip_state_dict
from .text import TextTokenizer, get_text_tokenizer_for
from .toklip import TOKENIZER_PREFIX, TokLIP

log = logging.getLogger(__name__)

# Prefixes foreign trainers put in front of the model's own keys: DDP's, and a LightningModule's.
_WRAPPER_PREFIXES = ("module.", "model.")


def build_toklip(
    name: str,
    *,
    tokenizer_checkpoint: str | os.PathLike | None = None,
    init_logit_bias: float | None = None,
    **overrides: Any,
) -> TokLIP:
    """A TokLIP model by preset, randomly initialised (the VQ loaded when a checkpoint is given).

    `overrides` replace preset fields: tokenizer, backbone, image_size, text (teacher is unused here).
    """
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Preset)}
    if unknown:
        raise TypeError(f"unknown override(s) for preset {name!r}: {', '.join(sorted(unknown))}")
    return build_toklip_from(
        dataclasses.replace(preset_of(name), **overrides), tokenizer_checkpoint=tokenizer_checkpoint, init_logit_bias=init_logit_bias
    )


def build_toklip_from(
    parts: Preset,
    *,
    tokenizer_checkpoint: str | os.PathLike | None = None,
    init_logit_bias: float | None = None,
    student_only: bool = False,
) -> TokLIP:
    """A TokLIP model from its parts, randomly initialised (the VQ loaded when a checkpoint is given).
    `student_only`: what training from a cache needs, the codebook and the token encoder (no VQ
    encoder or decoder, no text tower); its trainable weights have the whole model's names."""
    tokenizer = build_tokenizer(parts.tokenizer, checkpoint=tokenizer_checkpoint, source="tokenizer.checkpoint")
    if student_only:
        tokenizer = CodebookLookup(tokenizer)
    text = None if student_only else parts.text
    return TokLIP(tokenizer, backbone_spec(parts.backbone), parts.image_size, text, init_logit_bias=init_logit_bias)


def read_toklip_state_dict(path: str | os.PathLike, *, source: str | None = None) -> StateDict:
    """The model weights of a released TokLIP checkpoint, a toklip Lightning checkpoint or an export.

    Released checkpoints are whole training checkpoints whose optimizer state pickles numpy scalars;
    exactly those numpy globals are allow-listed.
    """
    raw = read_checkpoint(path, source=source, allowed_globals=NUMPY_SCALARS)
    state_dict = find_state_dict(raw, ("state_dict",), where=str(path))
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = strip_prefix(state_dict, prefix)
    return state_dict


def load_toklip(path: str | os.PathLike, preset: str | None = None, **overrides: Any) -> TokLIP:
    """Load TokLIP weights strictly into the preset's architecture, in eval mode.

    `preset` may be omitted for toklip exports, whose metadata record their architecture.
    """
    path = Path(path)
    state_dict = read_toklip_state_dict(path, source="load_toklip(path)")
    parts = preset_of(preset) if preset is not None else _architecture_from_sidecar(path)
    parts = dataclasses.replace(parts, **overrides)
    model = build_toklip_from(parts, init_logit_bias=0.0 if "logit_bias" in state_dict else None)
    state_dict, ignored = tokenizer_keys_to_ours(model, state_dict)
    report = load_state_dict_strict(model, state_dict, where=str(path), ignored=ignored)
    log.info("loaded %s (%s): %s", path, parts, report)
    return model.eval()


def tokenizer_keys_to_ours(model: TokLIP, state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """A checkpoint whose tokenizer (under `TOKENIZER_PREFIX`) keeps its family's own key names (an IBQ in
    SEED-Voken's) -> toklip's names, and the tokenizer keys it drops on purpose. toklip's own pass unchanged."""
    inner = {key.removeprefix(TOKENIZER_PREFIX): tensor for key, tensor in state_dict.items() if key.startswith(TOKENIZER_PREFIX)}
    converted, ignored = model.tokenizer.convert_state_dict(inner)
    outer = {key: tensor for key, tensor in state_dict.items() if not key.startswith(TOKENIZER_PREFIX)}
    return {**outer, **{TOKENIZER_PREFIX + key: tensor for key, tensor in converted.items()}}, [TOKENIZER_PREFIX + key for key in ignored]


def _architecture_from_sidecar(weights: Path) -> Preset:
    description = read_sidecar(weights, "architecture", "not a toklip export, or an older one: pass preset=...")
    return Preset(**json.loads(description["architecture"]))


def build_toklip_encoder(model: str, image_size: int, model_path: str | os.PathLike) -> TokLIP:
    """The reference code's entry point: a preset or reference model name, its resolution, weights."""
    name = REFERENCE_MODEL_NAMES.get(model, model)
    if preset_of(name).image_size != image_size:
        raise ValueError(f"{model!r} is a {preset_of(name).image_size} px model, not {image_size} px")
    return load_toklip(model_path, preset=name)


def get_text_tokenizer(name: str, tokenizer_path: str | os.PathLike | None = None) -> TextTokenizer:
    """The text tokenizer of a preset: list[str] -> (B, context_length) int64."""
    return get_text_tokenizer_for(preset_of(name).text, tokenizer_path)


def toklip_export_metadata(parts: Preset, preset_name: str | None = None) -> dict[str, str]:
    """What an export records (safetensors metadata is str -> str): its architecture, for `load_toklip`."""
    description = {"format": "toklip-safetensors", "architecture": json.dumps(dataclasses.asdict(parts), sort_keys=True)}
    if preset_name is not None:
        description["preset"] = preset_name
    return description


def export_toklip(state_dict: StateDict, parts: Preset, out: str | os.PathLike, *, preset_name: str | None = None) -> Path:
    """Write a self-contained TokLIP as safetensors, with a JSON sidecar recording its architecture."""
    return save_with_sidecar(state_dict, out, toklip_export_metadata(parts, preset_name))


def convert_released(checkpoint: str | os.PathLike, preset_name: str, out: str | os.PathLike) -> Path:
    """A released TokLIP training checkpoint -> safetensors of the model weights (checked strictly)."""
    state_dict = read_toklip_state_dict(checkpoint, source="checkpoint")
    with torch.device("meta"):
        model = build_toklip(preset_name, init_logit_bias=0.0 if "logit_bias" in state_dict else None)
    state_dict, ignored = tokenizer_keys_to_ours(model, state_dict)
    report = compare_state_dict(model, state_dict)
    report.ignored = ignored
    if not report.ok:
        raise ValueError(f"{checkpoint} does not fit preset {preset_name!r}:\n{report.describe()}")
    return export_toklip(state_dict, preset_of(preset_name), out, preset_name=preset_name)


def convert_teacher(model: str, pretrained: str | os.PathLike | None, out: str | os.PathLike) -> Path:
    """An open_clip model's weights (a file, or the HF cache) -> the safetensors file training reads."""
    path = find_teacher_weights(model, pretrained)
    state_dict = read_open_clip_state_dict(path, source="pretrained")
    with torch.device("meta"):
        report = compare_state_dict(build_open_clip(model), state_dict)
    if not report.ok:
        raise ValueError(f"{path} does not fit open_clip model {model!r}:\n{report}")
    return save_with_sidecar(state_dict, out, {"open_clip_model": model, "source": str(path)})
