"""Generation on TokLIP tokens: an autoregressive generator over VQ indices (see `generator`)."""

from .generator import GENERATOR_SPECS, INPUT_MODES, GeneratorSpec, IncrementalStream, TokenGenerator
from .module import GeneratorModule

__all__ = ["GENERATOR_SPECS", "INPUT_MODES", "GeneratorModule", "GeneratorSpec", "IncrementalStream", "TokenGenerator"]
