"""Frozen, pluggable VQ tokenizers. Importing this package registers every family."""

from . import llamagen, taming  # noqa: F401  (registration)
from .base import VQEncoding, VQTokenizer
from .conv_vq import ConvVQConfig, ConvVQModel
from .registry import TokenizerSpec, available_tokenizers, build_tokenizer, register_tokenizer, tokenizer_spec

__all__ = [
    "ConvVQConfig",
    "ConvVQModel",
    "TokenizerSpec",
    "VQEncoding",
    "VQTokenizer",
    "available_tokenizers",
    "build_tokenizer",
    "register_tokenizer",
    "tokenizer_spec",
]
