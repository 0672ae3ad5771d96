"""toklip-generate: images from a trained generator, for prompts or class ids.

toklip-generate checkpoint=runs/train/g/generator.safetensors 'prompts=["a large red shape on a black background"]'
toklip-generate checkpoint=runs/c2i/generator.safetensors 'classes=[207,360]' sampling.guidance_scale=2.0 \
    score.classnames=imagenet_classnames.txt
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import generate, print_metrics
from . import tool


@tool("generate")
def main(cfg: DictConfig) -> None:
    scores = generate(cfg)
    print_metrics(scores)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
