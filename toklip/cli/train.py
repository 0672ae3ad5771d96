"""toklip-train: train a TokLIP model (or a teacher, or a VQ tokenizer) from toklip/conf/train.yaml.

toklip-train experiment=tiny teacher.checkpoint=weights/tiny_teacher.safetensors trainer.max_steps=100
toklip-train -m experiment=tiny teacher.checkpoint=... optim.lr=3e-4,1e-3
"""

from __future__ import annotations

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from ..tasks import optimized_metric, print_metrics, train
from . import tool


@tool("train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    if rank_zero_only.rank == 0:
        print_metrics(metrics)
    return optimized_metric(cfg, metrics)  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
