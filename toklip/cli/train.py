"""toklip-train: train a TokLIP model from the Hydra configuration in conf/train.yaml.

    toklip-train experiment=tiny teacher.checkpoint=weights/tiny_teacher.safetensors trainer.max_steps=100
    toklip-train -m experiment=tiny teacher.checkpoint=... optim.lr=3e-4,1e-3
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..data.synthetic import SyntheticConfig, make_synthetic
from . import CONFIG_PATH

log = logging.getLogger(__name__)


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is ??? (interpolations to them are not followed: they are named at the source)."""
    if isinstance(node, DictConfig):
        items = ((key, node._get_node(key)) for key in node.keys())
    elif isinstance(node, ListConfig):
        items = ((index, node._get_node(index)) for index in range(len(node)))
    else:
        return []
    missing = []
    for key, child in items:
        path = f"{prefix}{key}"
        if isinstance(child, (DictConfig, ListConfig)):
            missing += _missing_keys(child, f"{path}.")
        elif child is not None and child._is_missing() and not child._is_interpolation():
            missing.append(path)
    return missing


def check_required(cfg: DictConfig) -> None:
    """Name every required (???) key left empty, before anything is built."""
    missing = sorted(key for key in _missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        raise ValueError(f"required configuration keys are not set: {', '.join(missing)} (set them on the command line, e.g. {missing[0]}=...)")


def prepare_synthetic_data(cfg: DictConfig) -> None:
    """data=synthetic: write the scenes on first use (kept, and found again, for the same parameters)."""
    synthetic = cfg.data.get("synthetic")
    if synthetic is not None:
        options = OmegaConf.to_container(synthetic, resolve=True)
        root = options.pop("root")
        make_synthetic(root, SyntheticConfig.from_options(options))


def resume_checkpoint(cfg: DictConfig) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume != "latest":
        if not Path(cfg.resume).is_file():
            raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
        return str(cfg.resume)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("resume=latest: no checkpoint in %s yet; starting from the beginning", last.parent)
    return None


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, fit, and return the final metrics (also written to metrics.json)."""
    check_required(cfg)
    L.seed_everything(cfg.seed, workers=True)
    prepare_synthetic_data(cfg)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("synthetic", None)  # the generator's parameters, used above
    datamodule = instantiate(data_cfg, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger), _convert_="all")
    trainer.fit(module, datamodule, ckpt_path=resume_checkpoint(cfg), weights_only=True)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def print_metrics(metrics: dict[str, Any]) -> None:
    width = max((len(k) for k in metrics), default=0)
    for name in sorted(metrics):
        print(f"{name:<{width}}  {metrics[name]:.4f}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        print_metrics(metrics)
    return metrics.get("train/loss")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
