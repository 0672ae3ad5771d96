"""toklip-demo-comprehension: the miniature's comprehension stage, on the newest toklip-demo output (`make demo-comprehension`).

toklip-demo-comprehension                                          # 3 inputs x seeds 0, 1, 2 x 4 shares of the questions
toklip-demo-comprehension comprehension.demo_dir=runs/demo/<time> 'comprehension.inputs=[toklip]'
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..miniature.comprehension import run_comprehension
from . import tool


@tool("demo_comprehension")
def main(cfg: DictConfig) -> None:
    run_comprehension(cfg)


if __name__ == "__main__":
    main()
