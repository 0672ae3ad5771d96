"""toklip-ask: a trained comprehension model answers questions about images.

toklip-ask checkpoint=runs/train/mllm/comprehension.safetensors image=photo.jpg question="what colour is the car?"
toklip-ask checkpoint=runs/train/mllm/comprehension.safetensors questions=gqa_testdev.jsonl image_folder=gqa/images
toklip-ask checkpoint=runs/train/mllm/comprehension.safetensors captions=coco_karpathy_test.jsonl image_folder=coco/val2014
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import ask, print_metrics
from . import tool


@tool("ask")
def main(cfg: DictConfig) -> None:
    result = ask(cfg)
    if "answer" in result:
        print(result["answer"])
    else:
        print_metrics(result)
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
