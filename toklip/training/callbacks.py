"""Callbacks of a toklip run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from ..checkpoints import StateDict, save_with_sidecar


class ExportableModule:
    """Mixin of the training modules: `export(out)` writes `export_contents()` (the weights and what
    describes them) as safetensors with a JSON sidecar. Collective when the weights are sharded: call
    it on every rank; only rank 0 writes."""

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        raise NotImplementedError

    def export(self, out: str | os.PathLike) -> Path:
        state, description = self.export_contents()
        if self._trainer is None or self.trainer.is_global_zero:
            save_with_sidecar(state, out, description)
        return Path(out)


class ExportModel(L.Callback):
    """At the end of training, `pl_module.export(<dirpath>/<filename>)`: the self-contained weights
    (a TokLIP model, a teacher, a VQ tokenizer). Called on every rank: gathering sharded weights is
    collective; only rank 0 writes."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "toklip.safetensors") -> None:
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export(self.path)
