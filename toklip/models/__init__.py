"""The TokLIP model, its parts and its factories."""

from .backbones import BACKBONES, BackboneSpec, backbone_spec
from .factory import build_toklip, build_toklip_encoder, get_text_tokenizer, load_toklip, read_toklip_state_dict
from .presets import PRESETS, Preset
from .teacher import InitReport, Teacher, init_from_teacher
from .token_encoder import TokenEncoder
from .toklip import TokLIP

__all__ = [
    "BACKBONES", "PRESETS", "BackboneSpec", "InitReport", "Preset", "Teacher", "TokLIP", "TokenEncoder",
    "backbone_spec", "build_toklip", "build_toklip_encoder", "get_text_tokenizer", "init_from_teacher",
    "load_toklip", "read_toklip_state_dict",
]
