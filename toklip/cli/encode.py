"""toklip-encode: images (a folder or shards) -> VQ indices, per-token features, embeddings.

toklip-encode experiment=tiny checkpoint=runs/train/a/toklip.safetensors input=photos/ output=encoded/
toklip-encode checkpoint=TokLIP_S_256.pt released_preset=toklip_s_256 'input="/data/{000..009}.tar"' format=safetensors
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import encode
from . import tool


@tool("encode")
def main(cfg: DictConfig) -> None:
    counts = encode(cfg)
    print(f"encoded {counts.get('encoded', 0)} images into {cfg.output} ({cfg.format}); skipped {counts.get('skipped', 0)}")


if __name__ == "__main__":
    main()
