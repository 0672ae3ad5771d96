"""Training: the TokLIP LightningModule, the miniature's teacher and VQ modules, optimiser, callbacks."""

from . import known_warnings  # noqa: F401  (filters, on import)
from .callbacks import CheckpointOnPreemption, ExportableModule, ExportModel
from .clip_teacher import CLIPTrainingModule
from .module import TokLIPModule
from .optim import AdamWCosine, param_groups, warmup_cosine
from .vq import VQTrainingModule

__all__ = [
    "AdamWCosine",
    "CLIPTrainingModule",
    "CheckpointOnPreemption",
    "ExportModel",
    "ExportableModule",
    "TokLIPModule",
    "VQTrainingModule",
    "param_groups",
    "warmup_cosine",
]
