"""toklip: train, evaluate and serve TokLIP visual tokenizers."""

from .checkpoints import CheckpointError
from .data import TokLIPDataModule
from .models import (
    PRESETS,
    Teacher,
    TokLIP,
    build_toklip,
    build_toklip_encoder,
    get_text_tokenizer,
    init_from_teacher,
    load_toklip,
)
from .training import TokLIPModule
from .tokenizers import VQEncoding, VQTokenizer, available_tokenizers, build_tokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    # toklip.train(cfg) lives with the command-line tools (it needs Hydra and conf/): imported on use.
    if name == "train":
        from .cli.train import train

        return train
    raise AttributeError(f"module 'toklip' has no attribute {name!r}")

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Teacher",
    "TokLIP",
    "TokLIPDataModule",
    "TokLIPModule",
    "VQEncoding",
    "VQTokenizer",
    "available_tokenizers",
    "build_tokenizer",
    "build_toklip",
    "build_toklip_encoder",
    "get_text_tokenizer",
    "init_from_teacher",
    "load_toklip",
    "train",
]
