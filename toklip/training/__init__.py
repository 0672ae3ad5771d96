"""Training: the TokLIP LightningModule, its optimiser and schedule, and callbacks."""

from .callbacks import ExportModel
from .module import TokLIPModule
from .optim import build_adamw, param_groups, warmup_cosine

__all__ = ["ExportModel", "TokLIPModule", "build_adamw", "param_groups", "warmup_cosine"]
