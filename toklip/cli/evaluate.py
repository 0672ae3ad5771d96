"""toklip-eval: zero-shot and retrieval scores of a model on the configured evaluation sets.

    toklip-eval checkpoint=runs/train/a/checkpoints/last.ckpt experiment=tiny      # a training checkpoint
    toklip-eval checkpoint=TokLIP_S_256.pt released_preset=toklip_s_256 eval=imagenet_coco \
        eval.sets.imagenet.root=/data/imagenet/val eval.sets.coco.captions=... eval.sets.coco.images=...
    toklip-eval experiment=tiny                                                     # the preset, random init

The model's composition (tokenizer, backbone, resolution, text) comes from the same groups as
toklip-train; a released file needs `released_preset`, an export records its own architecture.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import evaluate, print_metrics
from . import tool


@tool("eval")
def main(cfg: DictConfig) -> None:
    print_metrics(evaluate(cfg))
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
