"""toklip: train, evaluate and serve TokLIP visual tokenizers."""

from .checkpoints import CheckpointError
from .tokenizers import VQEncoding, VQTokenizer, available_tokenizers, build_tokenizer

__version__ = "0.1.0"

__all__ = ["CheckpointError", "VQEncoding", "VQTokenizer", "available_tokenizers", "build_tokenizer"]
