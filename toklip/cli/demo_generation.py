"""toklip-demo-generation: the miniature's generation stage, on the newest toklip-demo output (`make demo-generation`).

toklip-demo-generation                                        # both input modes x seeds 0, 1, 2
toklip-demo-generation generation.demo_dir=runs/demo/<time> 'generation.seeds=[0]'
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..miniature.generation import run_generation
from . import tool


@tool("demo_generation")
def main(cfg: DictConfig) -> None:
    run_generation(cfg)


if __name__ == "__main__":
    main()
