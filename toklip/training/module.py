"""TokLIPModule: trains the token encoder of a TokLIP model against a frozen text tower and teacher."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..checkpoints import CheckpointError, StateDict
from ..losses import ClipLoss, DistillLoss, SigLipLoss, clamp_logit_scale_
from ..models.factory import build_toklip, export_toklip
from ..models.input_alignment import solve_token_embedding, token_embedding_statistics
from ..models.presets import preset as preset_spec
from ..models.teacher import Teacher, find_teacher_weights, init_from_teacher, read_open_clip_state_dict
from ..models.text import get_text_tokenizer_for
from .optim import adamw_warmup_cosine
from .validation import EvalSetsValidation

log = logging.getLogger(__name__)


class TokLIPModule(EvalSetsValidation, L.LightningModule):
    """A TokLIP model, its frozen teacher, the losses, the optimiser and the validation metrics.

    The student is built from `preset` (+ `model_overrides`) and initialised from the teacher's
    weights (`teacher_checkpoint`, or the teacher's file in the existing HF cache): trunk, text tower
    and logit scale wherever name and shape match. The VQ (from `tokenizer_checkpoint`), the text
    tower and the teacher are frozen. `teacher` is an open_clip model name ("preset": the preset's);
    `teacher=None` with `distill_weight=0` trains without one (the text tower then stays random).
    `align_input=True` solves the fresh `vq_mapping` on the first batch so that the token embeddings
    reproduce the teacher's patch embeddings (`toklip.models.input_alignment`; the CPU miniature uses
    it, the release recipe does not), before the first optimizer step of a run that is not resumed.

    Gradient accumulation (`Trainer(accumulate_grad_batches=k)`) averages the losses of k micro-
    batches. For the distillation terms, means of per-sample terms, that is exactly the gradient of
    one k-times larger batch. The contrastive term of each micro-batch sees only that micro-batch's
    negatives (x ranks): k contrastive batches summed, not one k-times larger contrastive batch.
    """

    def __init__(
        self,
        preset: str = "tiny_64",
        *,
        model_overrides: Mapping[str, Any] | None = None,
        tokenizer_checkpoint: str | None = None,
        teacher: str | None = "preset",
        teacher_checkpoint: str | None = None,
        text_tokenizer_path: str | None = None,
        contrastive: str = "clip",
        local_loss: bool = False,
        gather_with_grad: bool = False,
        match_single_process: bool = True,
        distill_weight: float = 1000.0,
        distill_form: str = "mse",
        token_distill_weight: float = 0.0,
        lr: float = 1e-5,
        betas: Sequence[float] = (0.9, 0.95),
        eps: float = 1e-6,
        weight_decay: float = 0.1,
        no_decay_rule: str = "release",
        warmup_steps: int = 782,
        total_steps: int | None = None,
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        align_input: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if contrastive not in ("clip", "siglip"):
            raise ValueError(f"contrastive={contrastive!r}: choose clip (the release's softmax loss) or siglip")
        self.preset_name = preset
        self.model_overrides = dict(model_overrides or {})
        self.model = build_toklip(
            preset, tokenizer_checkpoint=tokenizer_checkpoint, init_logit_bias=-10.0 if contrastive == "siglip" else None, **self.model_overrides
        )
        self.teacher_name = preset_spec(preset).teacher if teacher == "preset" else teacher
        self.teacher = self._build_teacher(teacher_checkpoint) if self.teacher_name else None
        if self.teacher is None:
            log.warning("no teacher: the text tower of %s stays at its random init and nothing is distilled", preset)
        if self.teacher is None and align_input:
            raise ValueError("align_input fits the token embedding to a teacher's: set teacher, or align_input=False")
        if self.teacher is None and (distill_weight or token_distill_weight):
            raise ValueError("distillation needs a teacher: set teacher (an open_clip model) or distill_weight=0")
        self.contrastive = ClipLoss(local_loss, gather_with_grad, match_single_process) if contrastive == "clip" else SigLipLoss()
        self.distill = DistillLoss(distill_weight, distill_form, token_distill_weight) if self.teacher is not None else None
        self.model.visual.trunk.gradient_checkpointing = gradient_checkpointing
        if compile_blocks:
            for block in self.model.visual.trunk.blocks:
                block.compile()
        self.text_tokenizer = get_text_tokenizer_for(self.model.text_spec, text_tokenizer_path)
        self.eval_metrics = nn.ModuleDict()
        self._step_started = 0.0

    def _build_teacher(self, checkpoint: str | None) -> Teacher:
        weights = find_teacher_weights(self.teacher_name, checkpoint, source="teacher_checkpoint")
        state = read_open_clip_state_dict(weights, source="teacher_checkpoint")
        init_from_teacher(self.model, state)  # logs what it copied
        return Teacher(self.teacher_name, state, where=str(weights))

    # ---- training ---------------------------------------------------------------------------------

    def compute_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every loss term of a batch, by name (the total is their sum)."""
        images, tokens = batch["image"], batch["text"]
        wants_tokens = self.distill is not None and self.distill.token_weight > 0
        out = self.model(images, tokens, return_tokens=wants_tokens)
        if isinstance(self.contrastive, SigLipLoss):
            losses = {"contrastive": self.contrastive(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])}
        else:
            losses = {"contrastive": self.contrastive(out["image_features"], out["text_features"], out["logit_scale"])}
        if self.distill is not None:
            # The student's text tower is a frozen copy of the teacher's: only the image side is run.
            teacher_out = self.teacher(images, return_tokens=wants_tokens)
            teacher_image, teacher_tokens = teacher_out if wants_tokens else (teacher_out, None)
            losses.update(self.distill(out["image_features"], teacher_image, out.get("image_tokens"), teacher_tokens))
        return losses

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()
        if self.hparams.align_input and self.global_step == 0 and batch_idx == 0:
            self.align_input_to_teacher(batch["image"])

    def align_input_to_teacher(self, images: torch.Tensor) -> float:
        """Solve `vq_mapping` on this batch (its statistics summed over ranks, so ranks agree)."""
        if self.device_mesh is not None:
            raise ValueError("align_input writes whole weights; it does not support FSDP2's sharded ones")
        stats = token_embedding_statistics(self.model.visual.trunk, self.teacher, images)
        stats = {name: self.trainer.strategy.reduce(value, reduce_op="sum") for name, value in stats.items()}
        r2 = solve_token_embedding(self.model.visual.trunk, stats)
        log.info("token embedding fitted to the teacher's patch embedding: R^2 %.3f", r2)
        self.log("train/input_alignment_r2", r2, batch_size=images.shape[0])
        return r2

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        total = sum(losses.values())
        batch_size = batch["image"].shape[0]
        self.log_dict({f"train/loss_{name}": value.detach() for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        self.log("train/global_batch", float(batch_size * self.trainer.world_size), batch_size=batch_size)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "data_metrics") and self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_dict(datamodule.data_metrics(), reduce_fx="sum", sync_dist=True, batch_size=batch_size)
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        samples = batch["image"].shape[0] * self.trainer.world_size
        self.log("train/samples_per_second", samples / max(seconds, 1e-9), batch_size=batch["image"].shape[0])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        clamp_logit_scale_(self.model.logit_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.model.named_parameters())

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    def _scalar_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.model.logit_scale, self.model.logit_bias) if p is not None]

    def configure_model(self) -> None:
        """FSDP2 (Lightning's ModelParallelStrategy): shard each block, then the model as the root.

        FSDP2 cannot shard 0-d tensors, and the release's logit_scale is one: it stays replicated and
        its gradient is averaged by hand (`on_before_optimizer_step`). The teacher stays replicated
        too: it is frozen and has no gradients.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        data_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        for block in self.model.visual.trunk.blocks:
            fully_shard(block, mesh=data_mesh)
        fully_shard(self.model, mesh=data_mesh, ignored_params=set(self._scalar_parameters()))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.device_mesh is None:
            return
        for param in self._scalar_parameters():
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG)

    # ---- checkpoints and export -------------------------------------------------------------------

    def _checkpoint_keys(self) -> set[str]:
        """The trainable weights, plus any frozen part that has no file to be re-read from (a random VQ
        or, without a teacher, a random text tower)."""
        keys = {f"model.{name}" for name in self.model.trainable_parameters()}
        sourceless = [prefix for prefix, source in (("model.visual.trunk.vq.", self.hparams.tokenizer_checkpoint), ("model.text.", self.teacher)) if source is None]
        keys |= {key for key in self.state_dict() if key.startswith(tuple(sourceless))} if sourceless else set()
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what training changes; the VQ, the text tower and the teacher are re-read from their sources."""
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["toklip"] = {"preset": self.preset_name, "model_overrides": dict(self.model_overrides)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved, keep = set(checkpoint["state_dict"]), self._checkpoint_keys()
        if saved != keep:
            missing, unexpected = sorted(keep - saved), sorted(saved - keep)
            raise CheckpointError(
                f"checkpoint does not fit this model ({self.preset_name}): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        frozen = {k: v for k, v in self.state_dict().items() if k not in keep}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}

    def full_model_state_dict(self) -> StateDict:
        """The whole TokLIP model's weights, gathered to full tensors when sharded."""
        if self.device_mesh is None:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def export(self, out: str | os.PathLike) -> Path:
        """The self-contained model (VQ and text tower included) as safetensors, for `load_toklip`.
        Collective when sharded (call it on every rank); rank 0 writes."""
        state = self.full_model_state_dict()
        if self._trainer is None or self.trainer.is_global_zero:
            export_toklip(state, self.preset_name, out, self.model_overrides)
        return Path(out)
