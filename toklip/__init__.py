"""toklip: train, evaluate and serve TokLIP visual tokenizers."""

from .checkpoints import CheckpointError
from .config import compose_config
from .data import TokLIPDataModule
from .models import (
    Teacher,
    TokLIP,
    available_presets,
    build_toklip,
    build_toklip_encoder,
    get_text_tokenizer,
    init_from_teacher,
    load_toklip,
)
from .tasks import encode, evaluate, train
from .tokenizers import VQEncoding, VQTokenizer, available_tokenizers, build_tokenizer, register_tokenizer
from .training import TokLIPModule

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Teacher",
    "TokLIP",
    "TokLIPDataModule",
    "TokLIPModule",
    "VQEncoding",
    "VQTokenizer",
    "available_presets",
    "available_tokenizers",
    "build_tokenizer",
    "build_toklip",
    "build_toklip_encoder",
    "compose_config",
    "encode",
    "evaluate",
    "get_text_tokenizer",
    "init_from_teacher",
    "load_toklip",
    "register_tokenizer",
    "train",
]
