"""toklip-convert: a released TokLIP checkpoint, or an open_clip teacher, -> safetensors.

    toklip-convert what=released checkpoint=TokLIP_S_256.pt preset=toklip_s_256 out=toklip_s_256.safetensors
    toklip-convert what=teacher teacher_model=ViT-SO400M-16-SigLIP2-256 checkpoint=open_clip_model.safetensors out=teacher.safetensors
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..models.factory import convert_released, convert_teacher
from . import CONFIG_PATH


def convert(cfg: DictConfig) -> Path:
    if cfg.what == "released":
        if cfg.checkpoint is None:
            raise ValueError("checkpoint= must name the released TokLIP file (e.g. TokLIP_S_256.pt)")
        return convert_released(cfg.checkpoint, cfg.preset, cfg.out)
    if cfg.what == "teacher":
        return convert_teacher(cfg.teacher_model, cfg.checkpoint, cfg.out)
    raise ValueError(f"what={cfg.what!r}: choose released or teacher")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="convert")
def main(cfg: DictConfig) -> None:
    print(f"wrote {convert(cfg)}")


if __name__ == "__main__":
    main()
