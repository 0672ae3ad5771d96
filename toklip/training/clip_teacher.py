"""CLIPTrainingModule: trains a small open_clip CLIP from scratch, to serve as a TokLIP teacher.

The miniature has no pretrained SigLIP2 to distil from, so it trains its own teacher on the same
shards; the exported weights are both the teacher and the source of TokLIP's frozen text tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from ..checkpoints import StateDict
from ..config import settings_from_group
from ..losses import ClipLoss, clamp_logit_scale_
from ..models.teacher import build_open_clip, open_clip_config
from ..models.text import get_text_tokenizer_for
from .callbacks import ExportableModule
from .optim import AdamWCosine
from .validation import EvalSetsValidation


class CLIPTrainingModule(EvalSetsValidation, ExportableModule, L.LightningModule):
    """An open_clip model (`model`: a name open_clip or toklip knows) trained with the softmax CLIP loss."""

    export_filename = "teacher.safetensors"

    def __init__(
        self,
        model: str = "tiny_teacher_64",
        *,
        optim: Mapping[str, Any] | None = None,
        local_loss: bool = False,
        gather_with_grad: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim = settings_from_group(AdamWCosine, "optim", optim)
        self.clip = build_open_clip(model)
        self.contrastive = ClipLoss(local_loss, gather_with_grad)
        self.text_tokenizer = get_text_tokenizer_for(open_clip_config(model)["text_cfg"])
        self.eval_metrics = nn.ModuleDict()

    @property
    def eval_model(self) -> nn.Module:
        return self.clip

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image = self.clip.encode_image(batch["image"], normalize=True)
        text = self.clip.encode_text(batch["text"], normalize=True)
        loss = self.contrastive(image, text, self.clip.logit_scale.exp())
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", self.clip.logit_scale.detach().exp(), batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        clamp_logit_scale_(self.clip.logit_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.configure(self, self.clip.named_parameters())

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        """open_clip weights: what a TokLIP run's `teacher.checkpoint` reads."""
        return {k: v.detach().cpu() for k, v in self.clip.state_dict().items()}, {"open_clip_model": self.hparams.model}
