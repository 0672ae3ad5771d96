"""Generation on TokLIP tokens: an autoregressive generator over VQ indices (`generator`), its training
module and export (`module`), sampling (`sampling`) and scores (`evaluation`)."""

from .generator import GENERATOR_SPECS, INPUT_MODES, GeneratorSpec, IncrementalStream, TokenGenerator
from .module import GeneratorModule, check_toklip_fits, load_generator
from .sampling import SamplingSettings, prompt_embeddings, sample_images

__all__ = [
    "GENERATOR_SPECS",
    "INPUT_MODES",
    "GeneratorModule",
    "GeneratorSpec",
    "IncrementalStream",
    "SamplingSettings",
    "TokenGenerator",
    "check_toklip_fits",
    "load_generator",
    "prompt_embeddings",
    "sample_images",
]
