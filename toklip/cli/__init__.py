"""Console entry points: each a thin `@hydra.main` over a task of `toklip.tasks`."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ..checkpoints import CheckpointError
from ..config import CONFIG_MODULE, HYDRA_VERSION_BASE, ConfigError, check_brace_patterns, check_required
from ..data import DataQualityError
from ..distributed import end_process_group
from ..training.callbacks import RunPreempted

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # the configs ship inside the package
# What a user fixes in the command, the data or a file: one message, no traceback (HYDRA_FULL_ERROR=1 shows it).
USER_ERRORS = (ConfigError, DataQualityError, CheckpointError, RunPreempted)


def _as_tool(task_main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """`task_main` as a tool runs it: its own required keys checked first, the process group ended when
    it succeeds, and the errors a user can fix reported as one line."""

    @functools.wraps(task_main)
    def task(cfg: DictConfig) -> Any:
        try:
            check_required(cfg, in_groups=False)  # its own keys left at ???: one line here, not a traceback mid-task
            result = task_main(cfg)
            end_process_group()  # on CPU, a clean exit for every rank (gloo can abort it otherwise)
            return result
        except Exception as err:
            cause = err if isinstance(err, USER_ERRORS) else err.__cause__  # Hydra's instantiate wraps errors
            if not isinstance(cause, USER_ERRORS) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise SystemExit(f"{Path(sys.argv[0]).name}: {cause}") from None

    return task


def tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """`@hydra.main` over toklip's `config_name`, with the command line checked for unquoted brace
    patterns first (Hydra's own error names no key), and the errors a user can fix reported as one
    line. Called with a config, it runs on that config."""

    def decorate(task_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        hydra_main = hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_PATH, config_name=config_name)(_as_tool(task_main))

        @functools.wraps(task_main)
        def main(cfg: DictConfig | None = None) -> Any:
            if cfg is None:
                check_brace_patterns(sys.argv[1:])
            return hydra_main(cfg)

        return main

    return decorate
