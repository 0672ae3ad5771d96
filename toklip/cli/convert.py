"""toklip-convert: a released TokLIP checkpoint, or an open_clip teacher, -> safetensors.

toklip-convert what=released checkpoint=TokLIP_S_256.pt released_preset=toklip_s_256 out=toklip_s_256.safetensors
toklip-convert what=teacher teacher_model=ViT-SO400M-16-SigLIP2-256 checkpoint=open_clip_model.safetensors out=teacher.safetensors
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..tasks import convert
from . import tool


@tool("convert")
def main(cfg: DictConfig) -> None:
    print(f"wrote {convert(cfg)}")


if __name__ == "__main__":
    main()
