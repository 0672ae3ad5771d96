"""Frozen, pluggable VQ tokenizers. Importing this package registers every built-in family."""

from . import ibq, llamagen, taming  # noqa: F401  (registration)
from .base import CodebookLookup, VQEncoding, VQTokenizer
from .conv_vq import ConvVQConfig, ConvVQFactory, ConvVQModel
from .registry import (
    available_tokenizers,
    build_tokenizer,
    register_configured_tokenizer,
    register_tokenizer,
    tokenizer_downsample,
    tokenizer_factory,
)

__all__ = [
    "CodebookLookup",
    "ConvVQConfig",
    "ConvVQFactory",
    "ConvVQModel",
    "VQEncoding",
    "VQTokenizer",
    "available_tokenizers",
    "build_tokenizer",
    "register_configured_tokenizer",
    "register_tokenizer",
    "tokenizer_downsample",
    "tokenizer_factory",
]
