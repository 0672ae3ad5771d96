"""Callbacks of a toklip run."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..checkpoints import StateDict, save_with_sidecar


class ExportableModule:
    """Mixin of the training modules: `export(out)` writes `export_contents()` (the weights and what
    describes them) as safetensors with a JSON sidecar. Collective when the weights are sharded: call
    it on every rank; only rank 0 writes."""

    export_filename = "toklip.safetensors"  # what ExportModel names the export unless told otherwise

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        raise NotImplementedError

    def export(self, out: str | os.PathLike) -> Path:
        state, description = self.export_contents()
        if self._trainer is None or self.trainer.is_global_zero:
            save_with_sidecar(state, out, description)
        return Path(out)


class ExportModel(L.Callback):
    """At the end of training, `pl_module.export(<dirpath>/<filename>)`: the self-contained weights
    (a TokLIP model, a teacher, a VQ tokenizer, ...); without a filename, the module's `export_filename`.
    Called on every rank: gathering sharded weights is collective; only rank 0 writes."""

    def __init__(self, dirpath: str | os.PathLike, filename: str | None = None) -> None:
        self.dirpath, self.filename = Path(dirpath), filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export(self.dirpath / (self.filename or pl_module.export_filename))


class RunPreempted(RuntimeError):
    """The run was stopped by a signal before it finished; its last checkpoint holds the step it reached."""


class CheckpointOnPreemption(L.Callback):
    """On SIGTERM (clouds, Kubernetes, the end of a SLURM allocation) Lightning stops at the next step
    boundary; this saves `<dirpath>/preempted-step<step>.ckpt` there (`last.ckpt` stays ModelCheckpoint's),
    and `resume=latest` continues from that step.
    Outside SLURM, whose SIGUSR1 Lightning handles itself (an `hpc_ckpt_*` and a requeue), SIGUSR1
    counts as SIGTERM instead of killing the run outright."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self._previous_sigusr1: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigusr1()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigusr1()
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.dirpath / f"preempted-step{trainer.global_step:08d}.ckpt")

    def _restore_sigusr1(self) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None
