"""Named tokenizer specs and the factory that builds (and optionally loads) them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..checkpoints import LoadReport, StateDict, describe_source, find_state_dict, load_state_dict_strict, read_checkpoint
from .conv_vq import ConvVQConfig, ConvVQModel

# (state dict in the family's own layout) -> (state dict in ours, keys dropped on purpose)
KeyConverter = Callable[[StateDict, ConvVQConfig], tuple[StateDict, list[str]]]


def keep_keys(state_dict: StateDict, config: ConvVQConfig) -> tuple[StateDict, list[str]]:
    return state_dict, []


@dataclass(frozen=True)
class TokenizerSpec:
    config: ConvVQConfig
    convert_keys: KeyConverter = keep_keys
    allowed_globals: tuple[Any, ...] = ()  # globals a checkpoint of this family may pickle
    weights_keys: tuple[str, ...] = ("ema", "model", "state_dict")  # where weights sit, first found wins


_TOKENIZERS: dict[str, TokenizerSpec] = {}


def register_tokenizer(name: str, spec: TokenizerSpec) -> None:
    """Make `spec` buildable by `name`; a name is registered once."""
    if name in _TOKENIZERS:
        raise ValueError(f"tokenizer {name!r} is already registered")
    _TOKENIZERS[name] = spec


def available_tokenizers() -> list[str]:
    """The names `build_tokenizer` accepts."""
    return sorted(_TOKENIZERS)


def tokenizer_spec(name: str) -> TokenizerSpec:
    try:
        return _TOKENIZERS[name]
    except KeyError:
        raise KeyError(f"unknown tokenizer {name!r}; available: {', '.join(available_tokenizers())}") from None


def build_tokenizer(name: str, checkpoint: str | os.PathLike | None = None, *, source: str | None = None, **overrides: Any) -> ConvVQModel:
    """A frozen tokenizer by name, with random weights or strictly loaded from `checkpoint`.

    `overrides` replace fields of the named config (e.g. `codebook_size=1024`); `source` names the
    config key the checkpoint path came from, for error messages.
    """
    spec = tokenizer_spec(name)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ConvVQConfig)}
    if unknown:
        raise TypeError(f"unknown override(s) for tokenizer {name!r}: {', '.join(sorted(unknown))}")
    tokenizer = ConvVQModel(dataclasses.replace(spec.config, **overrides))
    if checkpoint is not None:
        load_tokenizer_weights(tokenizer, spec, checkpoint, source=source)
    return tokenizer


def load_tokenizer_weights(
    tokenizer: ConvVQModel, spec: TokenizerSpec, path: str | os.PathLike, *, source: str | None = None
) -> LoadReport:
    where = describe_source(path, source)
    raw = read_checkpoint(path, source=source, allowed_globals=spec.allowed_globals)
    state_dict, ignored = spec.convert_keys(find_state_dict(raw, spec.weights_keys, where=where), tokenizer.config)
    return load_state_dict_strict(tokenizer, state_dict, where=where, ignored=ignored)
