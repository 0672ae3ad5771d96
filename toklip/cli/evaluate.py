"""toklip-eval: zero-shot and retrieval scores of a model on the configured evaluation sets.

    toklip-eval checkpoint=runs/train/a/checkpoints/last.ckpt experiment=tiny      # a training checkpoint
    toklip-eval checkpoint=TokLIP_S_256.pt preset=toklip_s_256 eval=imagenet_coco \
        eval.sets.imagenet.root=/data/imagenet/val eval.sets.coco.captions=... eval.sets.coco.images=...
    toklip-eval experiment=tiny                                                     # the preset, random init

The model's composition (tokenizer, backbone, resolution, text) comes from the same groups as
toklip-train; a released file or an export needs only `preset` (exports name theirs).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..checkpoints import read_checkpoint
from ..data.eval_sets import build_eval_set
from ..data.transforms import eval_transform
from ..evaluation import evaluate
from ..models.factory import build_toklip, load_toklip
from ..models.text import get_text_tokenizer_for
from ..models.toklip import TokLIP
from . import CONFIG_PATH, resolve_device
from .train import prepare_synthetic_data, print_metrics


def _is_training_checkpoint(path: Path) -> bool:
    return path.suffix == ".ckpt" and "toklip" in read_checkpoint(path, source="checkpoint")


def load_model(cfg: DictConfig) -> TokLIP:
    """A training checkpoint (frozen parts rebuilt from its recorded sources), a released file or an
    export (`load_toklip`), or, with no checkpoint, the configured architecture at random init."""
    overrides = OmegaConf.to_container(cfg.model.model_overrides, resolve=True)
    if cfg.checkpoint is None:
        return build_toklip(cfg.preset, tokenizer_checkpoint=cfg.tokenizer.checkpoint, **overrides)
    path = Path(cfg.checkpoint)
    if _is_training_checkpoint(path):
        from ..training import TokLIPModule

        return TokLIPModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).model
    return load_toklip(path, preset=cfg.released_preset)


def evaluate_from_config(cfg: DictConfig) -> dict[str, float]:
    sets_cfg = OmegaConf.to_container(cfg.eval.sets, resolve=True)  # names any required path left empty
    if not sets_cfg:
        raise ValueError("no evaluation sets: choose eval=synthetic, eval=imagenet_coco, or set eval.sets")
    prepare_synthetic_data(cfg)
    model = load_model(cfg)
    transform = eval_transform(model.preprocess_cfg)
    eval_sets = {name: build_eval_set(spec, transform) for name, spec in sets_cfg.items()}
    device = resolve_device(cfg.device)
    tokenizer = get_text_tokenizer_for(model.text_spec, cfg.text.tokenizer_path)
    results = evaluate(model, eval_sets, tokenizer, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": cfg.checkpoint, "results": results}, indent=2) + "\n")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    results = evaluate_from_config(cfg)
    print_metrics(results)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
