"""toklip-encode: images (a folder or shards) -> VQ indices, per-token features, embeddings.

    toklip-encode experiment=tiny checkpoint=runs/train/a/toklip.safetensors input=photos/ output=encoded/
    toklip-encode checkpoint=TokLIP_S_256.pt released_preset=toklip_s_256 input='/data/{000..009}.tar' format=safetensors
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from ..encoding import encode_images
from . import CONFIG_PATH, resolve_device
from .evaluate import load_model


def encode_from_config(cfg: DictConfig) -> dict[str, int]:
    return encode_images(
        load_model(cfg), cfg.input, cfg.output, format=cfg.format, features=list(cfg.features), batch_size=cfg.batch_size,
        samples_per_file=cfg.samples_per_file, tokens_dtype=getattr(torch, cfg.tokens_dtype), device=resolve_device(cfg.device),
    )  # fmt: skip


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="encode")
def main(cfg: DictConfig) -> None:
    counts = encode_from_config(cfg)
    print(f"encoded {counts['encoded']} images into {cfg.output} ({cfg.format}); skipped {counts['skipped']}")


if __name__ == "__main__":
    main()
