"""toklip-convert: a released TokLIP checkpoint, or an open_clip teacher, -> safetensors.

toklip-convert what=released checkpoint=TokLIP_S_256.pt released_preset=toklip_s_256 out=toklip_s_256.safetensors
toklip-convert what=teacher teacher_model=ViT-SO400M-16-SigLIP2-256 checkpoint=open_clip_model.safetensors out=teacher.safetensors
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..config import HYDRA_VERSION_BASE
from ..tasks import convert
from . import CONFIG_PATH


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_PATH, config_name="convert")
def main(cfg: DictConfig) -> None:
    print(f"wrote {convert(cfg)}")


if __name__ == "__main__":
    main()
