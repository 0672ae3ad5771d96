"""toklip-make-synthetic: write the synthetic-scene shards and evaluation sets.

    toklip-make-synthetic out=data/synthetic train_samples=20000 image_size=64 seed=0
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ..data.synthetic import SyntheticConfig, SyntheticPaths, make_synthetic
from . import CONFIG_PATH


def make_synthetic_from_config(cfg: DictConfig) -> SyntheticPaths:
    options = OmegaConf.to_container(cfg, resolve=True)
    out, overwrite = options.pop("out"), options.pop("overwrite")
    return make_synthetic(out, SyntheticConfig.from_options(options), overwrite=overwrite)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="make_synthetic")
def main(cfg: DictConfig) -> None:
    paths = make_synthetic_from_config(cfg)
    print(f"train shards: {paths.train_urls}\nzero-shot set: {paths.zeroshot}\nretrieval set: {paths.retrieval_captions}")


if __name__ == "__main__":
    main()
