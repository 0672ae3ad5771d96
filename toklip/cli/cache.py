"""toklip-cache: the training cache of a run's shards (VQ indices and frozen embeddings of K views a sample).

toklip-cache experiment=tiny teacher.checkpoint=teacher.safetensors tokenizer.checkpoint=vq.safetensors output=cache/tiny
toklip-train experiment=tiny teacher.checkpoint=... tokenizer.checkpoint=... data=cache 'data.train_urls="cache/tiny/*.tar"'
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import cache
from . import tool


@tool("cache")
def main(cfg: DictConfig) -> None:
    counts = cache(cfg)
    print(f"cached {counts.get('encoded', 0)} samples x {cfg.views} views into {cfg.output}; skipped {counts.get('skipped', 0)}")


if __name__ == "__main__":
    main()
