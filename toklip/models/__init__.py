"""The TokLIP model, its parts and its factories."""

from .backbones import BACKBONES, BackboneSpec, backbone_spec
from .factory import build_toklip, build_toklip_encoder, get_text_tokenizer, load_toklip, read_toklip_state_dict
from .presets import Preset, available_presets, preset
from .teacher import InitReport, Teacher, init_from_teacher
from .token_encoder import CausalCache, TokenEncoder
from .toklip import TokLIP

__all__ = [
    "CausalCache",
    "BACKBONES",
    "BackboneSpec",
    "InitReport",
    "Preset",
    "Teacher",
    "TokLIP",
    "TokenEncoder",
    "available_presets",
    "backbone_spec",
    "build_toklip",
    "build_toklip_encoder",
    "get_text_tokenizer",
    "init_from_teacher",
    "load_toklip",
    "preset",
    "read_toklip_state_dict",
]
