"""Training: the TokLIP LightningModule, the miniature's teacher and VQ modules, optimiser, callbacks."""

from .callbacks import ExportModel
from .clip_teacher import CLIPTrainingModule
from .module import TokLIPModule
from .optim import build_adamw, param_groups, warmup_cosine
from .vq import VQTrainingModule

__all__ = ["CLIPTrainingModule", "ExportModel", "TokLIPModule", "VQTrainingModule", "build_adamw", "param_groups", "warmup_cosine"]
