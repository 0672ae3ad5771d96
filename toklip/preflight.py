"""Checks of a training configuration before anything heavy is built.

Every `_target_` node is checked against its target's signature (each key an argument, each value of
the argument's type; a target may add its own `check_arguments(**arguments)`), then the groups against
each other (the resolution against the tokenizer and, for input alignment, the teacher's patch grid;
the shards against the loader workers; a resumed checkpoint's model against the run's). A failure is one
`ConfigError` naming the key, the value and what is expected.
"""

from __future__ import annotations

import collections.abc
import inspect
import os
import types
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig

from .checkpoints import read_checkpoint
from .config import ConfigError
from .data.sources import resolve_sources
from .models.presets import preset_from_config
from .models.teacher import build_open_clip
from .tokenizers import tokenizer_downsample

_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def check_targets(node: Any, path: str = "") -> None:
    """Every `_target_` node under `node` (a resolved container): unknown arguments and wrong types."""
    if isinstance(node, dict):
        if "_target_" in node:
            _check_call(node, path)
        if node.get("_recursive_", True) is False:
            return  # Hydra passes its children as data: the target's own check_arguments judges them
        for key, value in node.items():
            check_targets(value, f"{path}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_targets(value, f"{path}{index}.")


def _check_call(node: dict[str, Any], path: str) -> None:
    target = get_object(node["_target_"])
    try:
        parameters = inspect.signature(target, eval_str=True).parameters
    except (NameError, TypeError, ValueError):  # annotations it cannot evaluate: check the names only
        parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in node.items():
        if key in _HYDRA_KEYS:
            continue
        parameter = parameters.get(key)
        if parameter is None:
            if not takes_any:
                raise ConfigError(f"{path}{key}: {node['_target_']} takes no such argument; it takes {', '.join(parameters)}")
            continue
        nested_target = isinstance(value, dict) and "_target_" in value
        if not nested_target and not _matches(value, parameter.annotation):
            raise ConfigError(f"{path}{key}={value!r}: expected {_describe(parameter.annotation)}")
    check_arguments = getattr(target, "check_arguments", None)  # a target's own checks of its arguments' contents
    if check_arguments is not None:
        check_arguments(**{key: value for key, value in node.items() if key not in _HYDRA_KEYS})


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain config value (None, bool, int, float, str, list, dict) fits an annotation.
    Annotations it cannot judge (classes, callables) accept anything: no false alarms."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (inspect.Parameter.empty, Any, object):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike):
        return isinstance(value, (str, os.PathLike))  # a Path where Python code calls
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def check_cached_run(cfg: DictConfig) -> None:
    """A run from a training cache (`model.inputs=cache`, set by data=cache) has no image side to
    validate with; evaluation sets are refused before anything is resolved (they may name data keys
    that a cache does not have)."""
    if cfg.model.get("inputs") == "cache" and cfg.eval.get("sets"):
        raise ConfigError(
            f"data=cache trains without images, so it cannot validate on eval sets {', '.join(cfg.eval.sets)}: "
            "add eval=none, then evaluate the export with toklip-eval"
        )


def check_resolution(cfg: DictConfig) -> None:
    """The image size must be a whole number of tokens."""
    downsample = tokenizer_downsample(cfg.tokenizer.name)
    if not isinstance(cfg.resolution, int) or cfg.resolution <= 0 or cfg.resolution % downsample:
        below = max(downsample, cfg.resolution // downsample * downsample) if isinstance(cfg.resolution, int) else downsample
        raise ConfigError(
            f"resolution={cfg.resolution!r}: expected a multiple of {downsample}, the downsample factor of tokenizer "
            f"{cfg.tokenizer.name} (e.g. {below} or {below + downsample})"
        )


def check_input_alignment(cfg: DictConfig) -> None:
    """`model.align_input` maps each token onto the teacher patch at its place: the two grids must agree."""
    if not cfg.model.get("align_input"):
        return
    with torch.device("meta"):  # shapes only: no memory, no weights
        teacher = build_open_clip(cfg.teacher.model)
    patch_embed = getattr(getattr(teacher.visual, "trunk", None), "patch_embed", None)
    if patch_embed is None:
        raise ConfigError(f"model.align_input=true needs a teacher with a timm ViT trunk; teacher.model={cfg.teacher.model} has none")
    patches = tuple(patch_embed.grid_size)
    tokens = (cfg.resolution // tokenizer_downsample(cfg.tokenizer.name),) * 2
    if patches != tokens:
        raise ConfigError(
            f"model.align_input=true: the teacher {cfg.teacher.model} sees {patches[0]}x{patches[1]} patches, the tokenizer "
            f"{cfg.tokenizer.name} gives {tokens[0]}x{tokens[1]} tokens at resolution={cfg.resolution}; the grids must agree"
        )


def check_shards(cfg: DictConfig) -> None:
    """The training shards exist, and (without resampling) every loader stream gets one of its own.
    (Data that is not a stream of shards, a conversation file, has none to check.)"""
    data = cfg.data
    if "train_urls" not in data:
        return
    try:
        sources = resolve_sources(data.train_urls)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.train_urls={data.train_urls!r}: {err}") from None
    shards = sum(len(source.urls) for source in sources)
    streams = _world_size(cfg) * max(data.num_workers, 1)
    if not data.get("resampled", False) and shards < streams:
        raise ConfigError(
            f"data.num_workers={data.num_workers}: {shards} shard(s) of {data.train_urls!r} cannot feed "
            f"{streams} loader streams ({_world_size(cfg)} rank(s) x {max(data.num_workers, 1)} workers), each needs one "
            f"of its own; use data.num_workers={max(shards // _world_size(cfg), 0)}, more shards, or data.resampled=true"
        )


def _world_size(cfg: DictConfig) -> int:
    """Ranks of the run: the launcher's, else the trainer's devices x nodes where they are numbers."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    return (devices if isinstance(devices, int) else 1) * (nodes if isinstance(nodes, int) else 1)


def check_resumed_model(cfg: DictConfig, checkpoint: str) -> None:
    """A TokLIP checkpoint records its model's parts: resuming it into another model is named as such."""
    # Its checksum was verified when resume_checkpoint chose it: reading it whole again would be a second pass.
    recorded = read_checkpoint(checkpoint, source="resume", verify=False).get("toklip")
    if recorded is None or "architecture" not in recorded:
        return
    run, saved = asdict(preset_from_config(cfg)), recorded["architecture"]
    if saved != run:
        raise ConfigError(
            f"resume={checkpoint}: this checkpoint is a {recorded.get('preset')} model ({_parts(saved)}), "
            f"the run is {cfg.preset} ({_parts(run)}); resume it with the configuration it was trained with"
        )


def _parts(architecture: dict[str, Any]) -> str:
    return f"{architecture['tokenizer']}, {architecture['backbone']}, {architecture['image_size']} px, text {architecture['text']}"
