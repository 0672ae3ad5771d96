"""Callbacks of a toklip run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class ExportModel(L.Callback):
    """At the end of training, `pl_module.export(<dirpath>/<filename>)`: the self-contained weights
    (a TokLIP model, a teacher, a VQ tokenizer). Called on every rank: gathering sharded weights is
    collective; only rank 0 writes."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "toklip.safetensors") -> None:
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export(self.path)
