"""Hydra configuration as the library sees it: composing toklip's configs, and checking them.

The configs ship inside the package (`toklip/conf`, `pkg://toklip.conf`). Library code composes them
with `compose_config`, inside whatever Hydra context is active (a tool's `@hydra.main`, with any
`--config-dir` the user added) or, when none is, in one of its own.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_MODULE = "toklip.conf"
HYDRA_VERSION_BASE = "1.3"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user can fix: the message names the key, the value and what is expected."""


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """One of toklip's configs (`train`, `demo`, ...) with command-line style overrides."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_module(CONFIG_MODULE, version_base=HYDRA_VERSION_BASE):
        return compose(config_name=config_name, overrides=list(overrides))


def config_group_options(group: str) -> list[str]:
    """The configs of a group (`preset`, `experiment`, ...) that composition can see."""
    if GlobalHydra.instance().is_initialized():
        return GlobalHydra.instance().config_loader().get_group_options(group)
    with initialize_config_module(CONFIG_MODULE, version_base=HYDRA_VERSION_BASE):
        return GlobalHydra.instance().config_loader().get_group_options(group)


def group_settings(group: str, given: Mapping[str, Any] | None, **defaults: Any) -> dict[str, Any]:
    """A config group's keys over their `defaults`; a key outside them is an error naming it, not a no-op."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{group}: unknown key(s) {', '.join(f'{group}.{key}' for key in unknown)}; it takes {', '.join(defaults)}")
    for key, value in given.items():  # a switch given "no" or "flase" would read as on
        if isinstance(defaults[key], bool) and not isinstance(value, bool):
            raise ConfigError(f"{group}.{key}={value!r}: expected true or false")
    return {**defaults, **given}


def settings_from_group(schema: type[T], group: str, given: Mapping[str, Any] | None) -> T:
    """A settings dataclass from a config group's keys over its defaults (unknown keys: an error)."""
    return schema(**group_settings(group, given, **asdict(schema())))


def check_brace_patterns(arguments: Sequence[str]) -> None:
    """Hydra's override grammar reads an unquoted `{` as a dictionary, so a shard pattern such as
    `data.train_urls=/data/{000..099}.tar` fails there without naming its key: name it, with the fix."""
    parser = OverridesParser.create()
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if argument.startswith("-") or not equals or "{" not in value:
            continue
        try:
            parser.parse_overrides([argument])
        except OverrideParseException:
            quoted = f"'{key}=\"{value}\"'"
            raise SystemExit(
                f"toklip: cannot read the override {argument!r}: Hydra reads an unquoted {{ as the start of a dictionary. "
                f"Quote the value for Hydra inside the shell's quotes: {quoted}"
            ) from None


def run_id() -> str:
    """One name for a run on every rank: the SLURM job or torchrun run id, else the start time."""
    for variable in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(variable)
        if value and value != "none":
            return f"{variable.split('_')[0].lower()}-{value}"
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def hydra_record_dir(resume: str | None) -> str:
    """Where Hydra records a run's configuration: `.hydra`, and for each resumed start a folder of its
    own inside it, so resuming never rewrites the record of how the run began."""
    return ".hydra" if resume is None else f".hydra/resumed-{datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S-%f')}"


for _name, _resolver in (("toklip_run_id", run_id), ("toklip_hydra_record_dir", hydra_record_dir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=True)


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is ??? (interpolations to them are not followed: they are named at the source)."""
    if isinstance(node, DictConfig):
        items = ((key, node._get_node(key)) for key in node)
    elif isinstance(node, ListConfig):
        items = ((index, node._get_node(index)) for index in range(len(node)))
    else:
        return []
    missing = []
    for key, child in items:
        path = f"{prefix}{key}"
        if isinstance(child, (DictConfig, ListConfig)):
            missing += _missing_keys(child, f"{path}.")
        elif child is not None and child._is_missing() and not child._is_interpolation():
            missing.append(path)
    return missing


def check_required(cfg: DictConfig, *, in_groups: bool = True) -> None:
    """Name every required (???) key left empty, before anything is built; with `in_groups=False` only the
    top-level ones (a tool's own keys: a group's may be required only by a task the tool does not run)."""
    missing = sorted(key for key in _missing_keys(cfg) if not key.startswith("hydra.") and (in_groups or "." not in key))
    if missing:
        raise ConfigError(
            f"required configuration keys are not set: {', '.join(missing)} (set them on the command line, e.g. {missing[0]}=...)"
        )
