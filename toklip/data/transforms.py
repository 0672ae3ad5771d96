"""Image transforms of the recipe, built by open_clip from a preprocessing config."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform
from PIL import Image

from ..tokenizers.base import VQTokenizer

Transform = Callable[[Image.Image], torch.Tensor]
TRAIN_CROP_SCALE = (0.9, 1.0)  # the release's RandomResizedCrop scale; no flip, no colour jitter


def preprocess_config(
    image_size: int,
    mean: Sequence[float] = VQTokenizer.input_mean,
    std: Sequence[float] = VQTokenizer.input_std,
    resize_mode: str = "shortest",
) -> PreprocessCfg:
    """Defaults: the VQ tokenizer's [-1, 1] input, bicubic, shortest side + centre crop for eval."""
    return PreprocessCfg(size=image_size, mean=tuple(mean), std=tuple(std), interpolation="bicubic", resize_mode=resize_mode)


def train_transform(cfg: PreprocessCfg, crop_scale: Sequence[float] = TRAIN_CROP_SCALE) -> Transform:
    """RandomResizedCrop(scale, bicubic) -> tensor -> normalise."""
    return image_transform(
        cfg.size,
        is_train=True,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        aug_cfg=AugmentationCfg(scale=tuple(crop_scale)),
    )


def eval_transform(cfg: PreprocessCfg) -> Transform:
    """`squash` resizes to SxS (the release's in-training validation); `shortest` resizes the
    shortest side and centre-crops (its evaluation scripts)."""
    return image_transform(
        cfg.size, is_train=False, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation, resize_mode=cfg.resize_mode
    )


@contextlib.contextmanager
def seeded_augmentation(seed: int) -> Iterator[None]:
    """Random augmentations drawn inside come from `seed` alone, and leave the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds lazy devices (~0.2 ms)
        yield


def view_seed(seed: int, key: str, view: int) -> int:
    """The augmentation seed of view `view` of the sample `key`: the same in every run, rank and worker."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}/{view}".encode(), digest_size=8).digest(), "little") >> 2
