"""Encoding at scale: images -> TokLIP outputs for downstream models, or a training cache; a distributed,
resumable job over input shards (see `job`)."""

from .encoders import FEATURES, CacheEncoder, FeatureEncoder
from .job import FORMATS, MANIFEST, run_encode_job
from .parts import InputPart, input_parts

__all__ = [
    "FEATURES",
    "FORMATS",
    "MANIFEST",
    "CacheEncoder",
    "FeatureEncoder",
    "InputPart",
    "input_parts",
    "run_encode_job",
]
