"""Console entry points: each a thin `@hydra.main` over a task of `toklip.tasks`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from ..config import CONFIG_MODULE, HYDRA_VERSION_BASE, check_brace_patterns

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # the configs ship inside the package


def tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """`@hydra.main` over toklip's `config_name`, with the command line checked for unquoted brace
    patterns first (Hydra's own error names no key). Called with a config, it runs on that config."""

    def decorate(task_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        hydra_main = hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_PATH, config_name=config_name)(task_main)

        @functools.wraps(task_main)
        def main(cfg: DictConfig | None = None) -> Any:
            if cfg is None:
                check_brace_patterns(sys.argv[1:])
            return hydra_main(cfg)

        return main

    return decorate
