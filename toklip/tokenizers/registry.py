"""The tokenizer registry: names -> factory functions, as timm registers its models.

A factory takes keyword options and returns a randomly initialised `VQTokenizer`; `build_tokenizer`
then loads its checkpoint through the tokenizer's own `load_weights`. Register your own with the
decorator, or name a `_target_` in a `tokenizer/` config (`register_configured_tokenizer`):

    @toklip.register_tokenizer
    def my_vq(codebook_size: int = 4096) -> VQTokenizer:
        return MyVQ(codebook_size)
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from hydra.utils import get_object

from ..config import ConfigError
from .base import VQTokenizer

TokenizerFactory = Callable[..., VQTokenizer]
F = TypeVar("F", bound=TokenizerFactory)

_FACTORIES: dict[str, TokenizerFactory] = {}
log = logging.getLogger(__name__)


def register_tokenizer(factory: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Make `factory` buildable by `name` (default: the function's name); a name is registered once.
    Use it bare (`@register_tokenizer`), with a name (`@register_tokenizer(name="x")`), or as a call."""

    def add(factory: F) -> F:
        key = name or factory.__name__
        if key in _FACTORIES and _FACTORIES[key] != factory:
            raise ValueError(f"tokenizer {key!r} is already registered (by {_FACTORIES[key]!r})")
        _FACTORIES[key] = factory
        return factory

    return add if factory is None else add(factory)


def available_tokenizers() -> list[str]:
    """The names `build_tokenizer` accepts."""
    return sorted(_FACTORIES)


def tokenizer_factory(name: str) -> TokenizerFactory:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise KeyError(
            f"unknown tokenizer {name!r}; available: {', '.join(available_tokenizers())} "
            "(register your own with toklip.register_tokenizer, or give a _target_ in its tokenizer/ config)"
        ) from None


def build_tokenizer(name: str, checkpoint: str | os.PathLike | None = None, *, source: str | None = None, **options: Any) -> VQTokenizer:
    """A frozen tokenizer by name, with random weights or strictly loaded from `checkpoint`.

    `options` go to the factory (the built-in families take fields of their config, e.g.
    `codebook_size=1024`); `source` names the config key the checkpoint path came from, for errors.
    """
    tokenizer = tokenizer_factory(name)(**options)
    if not isinstance(tokenizer, VQTokenizer):
        raise TypeError(f"the factory of tokenizer {name!r} returned a {type(tokenizer).__name__}, not a toklip VQTokenizer")
    if checkpoint is not None:
        report = tokenizer.load_weights(checkpoint, source=source)
        if report.ignored:
            log.info("tokenizer %s loaded from %s; %s", name, checkpoint, report)
    return tokenizer


def tokenizer_downsample(name: str) -> int:
    """Pixels per token of a registered tokenizer, found without allocating its weights."""
    with torch.device("meta"):
        return build_tokenizer(name).downsample


@dataclass(frozen=True)
class ConfiguredTokenizer:
    """The factory a `tokenizer/` config with a `_target_` names: its target called with its options."""

    target: str
    options: tuple[tuple[str, Any], ...]

    def __call__(self, **overrides: Any) -> VQTokenizer:
        return get_object(self.target)(**{**dict(self.options), **overrides})


def register_configured_tokenizer(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A `tokenizer/` group's keys -> {name, checkpoint}, with its `_target_` (if any) registered as `name`.

    Without `_target_` the group takes exactly `name` and `checkpoint`; with one, every other key is an
    argument of the target (a factory or a `VQTokenizer` subclass). Errors name the key at fault.
    """
    settings = dict(settings)
    target = settings.pop("_target_", None)
    if "name" not in settings:
        raise ConfigError("tokenizer: the group needs a name (the name its checkpoints and exports record)")
    name, checkpoint = settings.pop("name"), settings.pop("checkpoint", None)
    if target is None:
        if settings:
            raise ConfigError(
                f"tokenizer: unknown key(s) {', '.join(f'tokenizer.{k}' for k in sorted(settings))}; it takes name, checkpoint"
            )
        return {"name": name, "checkpoint": checkpoint}
    try:
        factory = get_object(target)
        inspect.signature(factory).bind(**settings)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"tokenizer._target_={target}: cannot import it ({err})") from None
    except TypeError as err:
        raise ConfigError(f"tokenizer: {target} does not take these arguments: {err}") from None
    try:
        register_tokenizer(ConfiguredTokenizer(target, tuple(sorted(settings.items()))), name=name)
    except ValueError as err:
        raise ConfigError(f"tokenizer.name={name}: {err}; give this tokenizer another name") from None
    return {"name": name, "checkpoint": checkpoint}
