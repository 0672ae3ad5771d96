"""toklip-make-synthetic: write the synthetic-scene shards and evaluation sets.

toklip-make-synthetic out=data/synthetic train_samples=20000 image_size=64 seed=0
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import make_synthetic
from . import tool


@tool("make_synthetic")
def main(cfg: DictConfig) -> None:
    paths = make_synthetic(cfg)
    print(f"train shards: {paths.train_urls}\nzero-shot set: {paths.zeroshot}\nretrieval set: {paths.retrieval_captions}")


if __name__ == "__main__":
    main()
