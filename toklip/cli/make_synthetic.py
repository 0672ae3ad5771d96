"""toklip-make-synthetic: write the synthetic-scene shards and evaluation sets.

toklip-make-synthetic out=data/synthetic train_samples=20000 image_size=64 seed=0
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..config import HYDRA_VERSION_BASE
from ..tasks import make_synthetic
from . import CONFIG_PATH


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_PATH, config_name="make_synthetic")
def main(cfg: DictConfig) -> None:
    paths = make_synthetic(cfg)
    print(f"train shards: {paths.train_urls}\nzero-shot set: {paths.zeroshot}\nretrieval set: {paths.retrieval_captions}")


if __name__ == "__main__":
    main()
