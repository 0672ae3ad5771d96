"""Data: WebDataset training streams, evaluation sets, transforms and the synthetic-scene generator."""

from .cache import CacheDataModule
from .datamodule import DataQualityError, TokLIPDataModule
from .eval_sets import RetrievalSet, ZeroShotSet, build_eval_set, build_eval_sets
from .samples import SKIP_REASONS, to_rgb
from .sources import resolve_sources
from .synthetic import SyntheticConfig, make_synthetic
from .transforms import eval_transform, preprocess_config, train_transform

__all__ = [
    "SKIP_REASONS",
    "CacheDataModule",
    "DataQualityError",
    "RetrievalSet",
    "SyntheticConfig",
    "TokLIPDataModule",
    "ZeroShotSet",
    "build_eval_set",
    "build_eval_sets",
    "eval_transform",
    "make_synthetic",
    "preprocess_config",
    "resolve_sources",
    "to_rgb",
    "train_transform",
]
