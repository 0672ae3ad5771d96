"""Callbacks of a TokLIP run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class ExportModel(L.Callback):
    """At the end of training, write the whole model as `<dirpath>/<filename>` (+ a JSON sidecar)."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "toklip.safetensors") -> None:
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = pl_module.full_model_state_dict()  # collective when sharded: every rank takes part
        if trainer.is_global_zero:
            from ..models.factory import export_toklip

            export_toklip(state, pl_module.preset_name, self.path, pl_module.model_overrides)
