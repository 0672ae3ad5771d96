"""toklip-demo: the CPU miniature, end to end (`make demo`).

toklip-demo                                   # stages, evaluation, report under runs/demo/<time>/
toklip-demo 'stage_overrides=["trainer.max_steps=20"]'   # a quicker, rougher run
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..miniature import run_demo
from . import tool


@tool("demo")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
