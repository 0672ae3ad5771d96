"""TokLIPModule: trains the token encoder of a TokLIP model against a frozen text tower and teacher."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from ..checkpoints import CheckpointError, StateDict, file_sha256, load_state_dict_strict
from ..config import group_settings, settings_from_group
from ..losses import DistillLoss, LossSettings, SigLipLoss, clamp_logit_scale_
from ..models.factory import build_toklip_from, toklip_export_metadata
from ..models.input_alignment import solve_token_embedding, token_embedding_statistics
from ..models.presets import Preset
from ..models.presets import preset as preset_spec
from ..models.teacher import Teacher, init_from_teacher, teacher_state_dict
from ..models.text import TextTokenizer, get_text_tokenizer_for
from ..models.toklip import TOKENIZER_PREFIX, TokLIP
from ..tokenizers import register_configured_tokenizer
from ..tokenizers.base import codebook_fingerprint
from .callbacks import ExportableModule
from .optim import AdamWCosine
from .strategies import gathered_state_dict, shard_with_fsdp2
from .validation import EvalSetsValidation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _RunSettings:
    """The module's arguments read into settings: the preset's parts replaced by the groups given."""

    ARGUMENTS: ClassVar[tuple[str, ...]] = ("preset", "tokenizer", "backbone", "image_size", "text", "teacher", "loss", "optim")

    architecture: Preset
    tokenizer: dict[str, Any]
    text: dict[str, Any]
    teacher: dict[str, Any]
    loss: LossSettings
    optim: AdamWCosine

    @classmethod
    def of(
        cls,
        preset: str | None,
        tokenizer: Mapping[str, Any] | None,
        backbone: Mapping[str, Any] | None,
        image_size: int | None,
        text: Mapping[str, Any] | None,
        teacher: Mapping[str, Any] | None,
        loss: Mapping[str, Any] | None,
        optim: Mapping[str, Any] | None,
    ) -> _RunSettings:
        parts = preset_spec(preset or "tiny_64")
        tokenizer = register_configured_tokenizer({"name": parts.tokenizer, "checkpoint": None, **(tokenizer or {})})
        backbone = group_settings("backbone", backbone, name=parts.backbone)
        text = group_settings("text", text, name=parts.text, tokenizer_path=None)
        teacher = group_settings("teacher", teacher, model=parts.teacher, checkpoint=None)
        architecture = Preset(tokenizer["name"], backbone["name"], image_size or parts.image_size, text["name"], teacher["model"])
        loss_settings = settings_from_group(LossSettings, "loss", loss)
        return cls(architecture, tokenizer, text, teacher, loss_settings, settings_from_group(AdamWCosine, "optim", optim))


class TokLIPModule(EvalSetsValidation, ExportableModule, L.LightningModule):
    """A TokLIP model, its frozen teacher, the losses, the optimiser and the validation metrics.

    The parts come from `preset` (a `preset/` config), each replaced by the config group of the same
    name when given: `tokenizer` ({name, checkpoint}), `backbone` ({name}), `image_size`, `text`
    ({name, tokenizer_path}) and `teacher` ({model, checkpoint}; model null: no teacher). `loss` and
    `optim` hold the keys of `LossSettings` and `AdamWCosine`. A key a group does not take is an error.

    The student is initialised from the teacher's weights (`teacher.checkpoint`, or the teacher's
    file in the existing HF cache): trunk, text tower and logit scale wherever name and shape match.
    The VQ (from `tokenizer.checkpoint`), the text tower and the teacher are frozen. Without a
    teacher (and with no distillation) the text tower stays random. `align_input=True` solves the
    fresh `vq_mapping` on the first batch so that the token embeddings reproduce the teacher's patch
    embeddings (`toklip.models.input_alignment`; the CPU miniature uses it, the release recipe does
    not), before the first optimizer step of a run that is not resumed.

    `inputs="cache"` (data=cache) trains from the frozen networks' outputs precomputed by
    `toklip-cache`: only the codebook and the token encoder are built, never the VQ encoder and
    decoder, the text tower or the teacher. A step then runs the student alone; the losses are those
    of a live step on the same crop (`student_losses` serves both), and checkpoints and exports are
    interchangeable with a live run's.

    Gradient accumulation (`Trainer(accumulate_grad_batches=k)`) averages the losses of k micro-
    batches. For the distillation terms, means of per-sample terms, that is exactly the gradient of
    one k-times larger batch. The contrastive term of each micro-batch sees only that micro-batch's
    negatives (x ranks): k contrastive batches summed, not one k-times larger contrastive batch.
    """

    def __init__(
        self,
        preset: str = "tiny_64",
        *,
        tokenizer: Mapping[str, Any] | None = None,
        backbone: Mapping[str, Any] | None = None,
        image_size: int | None = None,
        text: Mapping[str, Any] | None = None,
        teacher: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        align_input: bool = False,
        inputs: str = "images",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preset_name = preset
        settings = _RunSettings.of(preset, tokenizer, backbone, image_size, text, teacher, loss, optim)
        self.architecture, self.loss_settings, self.optim = settings.architecture, settings.loss, settings.optim
        self.tokenizer_cfg, text_cfg, self.teacher_cfg = settings.tokenizer, settings.text, settings.teacher
        self.cached = self._check_inputs(inputs, align_input)
        self.model = self._build_model(student_only=self.cached)
        self.teacher = self._init_from_teacher() if self.architecture.teacher else None
        losses = self.loss_settings
        if not self.architecture.teacher:
            log.warning("no teacher: the text tower of %s stays at its random init and nothing is distilled", preset)
        if not self.architecture.teacher and align_input:
            raise ValueError("align_input fits the token embedding to a teacher's: set teacher.model, or align_input=False")
        if not self.architecture.teacher and (losses.distill_weight or losses.token_distill_weight):
            raise ValueError("distillation needs a teacher: set teacher.model (an open_clip model) or loss.distill_weight=0")
        self.contrastive = losses.contrastive_loss()
        self.distill = (
            DistillLoss(losses.distill_weight, losses.distill_form, losses.token_distill_weight) if self.architecture.teacher else None
        )
        self.model.visual.trunk.gradient_checkpointing = gradient_checkpointing
        if compile_blocks:
            for block in self.model.visual.trunk.blocks:
                block.compile()
        self.text_tokenizer_path = text_cfg["tokenizer_path"]
        self.eval_metrics = nn.ModuleDict()
        self._step_started = 0.0

    @functools.cached_property
    def text_tokenizer(self) -> TextTokenizer:
        """The text tower's tokenizer, loaded when first asked for: validation and toklip-cache read
        captions, a training step does not (the data module tokenizes them)."""
        return get_text_tokenizer_for(self.architecture.text, self.text_tokenizer_path)

    def _check_inputs(self, inputs: str, align_input: bool) -> bool:
        """True for `inputs=cache`, after checking that such a run can keep its checkpoints and exports whole."""
        if inputs not in INPUTS:
            raise ValueError(f"inputs={inputs!r}: choose {' or '.join(INPUTS)}")
        if inputs == "images":
            return False
        missing = [
            need
            for need, given in (
                ("tokenizer.checkpoint (the export rebuilds the VQ from it)", self.tokenizer_cfg["checkpoint"]),
                ("teacher.model (the text embeddings of the cache are its text tower's)", self.architecture.teacher),
            )
            if not given
        ]
        if missing:
            raise ValueError(f"training from a cache (data=cache) needs {' and '.join(missing)}")
        if align_input:
            raise ValueError("align_input fits the token embedding on live images; it cannot run from a cache (align_input=false)")
        return True

    @staticmethod
    def check_arguments(**arguments: Any) -> None:
        """The groups' keys, checked before anything is built (toklip.preflight calls this)."""
        _RunSettings.of(**{name: arguments.get(name) for name in _RunSettings.ARGUMENTS})

    def _build_model(self, student_only: bool) -> TokLIP:
        return build_toklip_from(
            self.architecture,
            tokenizer_checkpoint=self.tokenizer_cfg["checkpoint"],
            init_logit_bias=-10.0 if self.loss_settings.contrastive == "siglip" else None,
            student_only=student_only,
        )

    def _teacher_state(self) -> StateDict:
        return teacher_state_dict(self.architecture.teacher, self.teacher_cfg["checkpoint"], source="teacher.checkpoint")

    def _init_from_teacher(self) -> Teacher | None:
        """The student starts from the teacher's weights; the teacher itself is built for live inputs only."""
        state = self._teacher_state()
        init_from_teacher(self.model, state)  # logs what it copied
        return None if self.cached else Teacher(self.architecture.teacher, state)

    # ---- training ---------------------------------------------------------------------------------

    @property
    def wants_teacher_tokens(self) -> bool:
        return self.distill is not None and self.distill.token_weight > 0

    @torch.no_grad()
    def image_targets(self, images: torch.Tensor, teacher_tokens: bool = False) -> dict[str, torch.Tensor]:
        """What the frozen image side makes of a batch: the VQ indices and, with a teacher, its image
        embedding (`teacher_features`) and, with `teacher_tokens`, its patch tokens. The training
        cache stores exactly these."""
        targets = {"indices": self.model.tokenizer.encode(images).indices}
        if self.teacher is not None:
            if teacher_tokens:
                targets["teacher_features"], targets["teacher_tokens"] = self.teacher(images, return_tokens=True)
            else:
                targets["teacher_features"] = self.teacher(images)
        return targets

    @torch.no_grad()
    def text_targets(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen text tower's normalised caption embeddings (`text_features`), as the cache stores them."""
        return {"text_features": self.model.encode_text(tokens, normalize=True)}

    def training_targets(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The frozen networks' outputs for a batch: computed from its images and captions, or, from a
        cache, read from the batch itself."""
        if self.cached:
            return {name: value for name, value in batch.items() if name in CACHED_TARGETS}
        return {**self.image_targets(batch["image"], self.wants_teacher_tokens), **self.text_targets(batch["text"])}

    def compute_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every loss term of a batch, by name (the total is their sum)."""
        return self.student_losses(self.training_targets(batch))

    def student_losses(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses of the token encoder against the frozen targets: the one computation live and cached
        steps share. The trunk reads the codebook vectors of the indices (`lookup`), both ways."""
        image_features, token_features = self.model.encode_indices(targets["indices"], normalize=True, return_tokens=True)
        logit_scale = self.model.logit_scale.exp()
        if isinstance(self.contrastive, SigLipLoss):
            losses = {"contrastive": self.contrastive(image_features, targets["text_features"], logit_scale, self.model.logit_bias)}
        else:
            losses = {"contrastive": self.contrastive(image_features, targets["text_features"], logit_scale)}
        if self.distill is not None:
            student_tokens = token_features if self.wants_teacher_tokens else None
            if student_tokens is not None and "teacher_tokens" not in targets:
                raise ValueError(
                    "loss.token_distill_weight > 0 needs the teacher's patch tokens: a cache made with teacher_tokens=true, "
                    "read with data.read_teacher_tokens=true"
                )
            losses.update(self.distill(image_features, targets["teacher_features"], student_tokens, targets.get("teacher_tokens")))
        return losses

    def on_fit_start(self) -> None:
        if self.cached:
            datamodule = getattr(self.trainer, "datamodule", None)
            if not hasattr(datamodule, "check_model"):
                raise ValueError("model.inputs=cache reads a training cache: use data=cache (a cache made by toklip-cache)")
            datamodule.check_model(asdict(self.architecture), codebook_fingerprint(self.model.tokenizer.table), self.teacher_sha256())

    def teacher_sha256(self) -> str | None:
        """The SHA-256 of the teacher file (None: a random-init teacher): what a training cache records and checks."""
        checkpoint = self.teacher_cfg["checkpoint"]
        return None if checkpoint is None else file_sha256(checkpoint)

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
        batch_size = batch_size_of(batch)
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
        batch_size = batch_size_of(batch)
        self.log("train/samples_per_second", batch_size * self.trainer.world_size / max(seconds, 1e-9), batch_size=batch_size)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        clamp_logit_scale_(self.model.logit_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.configure(self, self.model.named_parameters())

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    def _scalar_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.model.logit_scale, self.model.logit_bias) if p is not None]

    def configure_model(self) -> None:
        """FSDP2 (Lightning's ModelParallelStrategy): shard each block, then the model as the root;
        `encode_indices`, what a step runs, gathers the root's shards as `forward` does.

        FSDP2 cannot shard 0-d tensors, and the release's logit_scale is one: it stays replicated and
        its gradient is averaged by hand (`on_before_optimizer_step`). The frozen parts (the VQ, the
        text tower, the teacher) stay replicated too: they have no gradients and run outside the student.
        """
        if self.device_mesh is None:
            return
        frozen = [self.model.tokenizer, *([self.model.text] if self.model.text is not None else [])]
        ignored = {*self._scalar_parameters(), *(p for part in frozen for p in part.parameters())}
        shard_with_fsdp2(self.model, list(self.model.visual.trunk.blocks), self.device_mesh, ignored, forward_methods=("encode_indices",))

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
        sourceless = [
            prefix
            for prefix, source in (
                (f"model.{TOKENIZER_PREFIX}", self.tokenizer_cfg["checkpoint"]),
                ("model.text.", self.architecture.teacher),
            )
            if source is None
        ]
        keys |= {key for key in self.state_dict() if key.startswith(tuple(sourceless))} if sourceless else set()
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what training changes; the VQ, the text tower and the teacher are re-read from their sources."""
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["toklip"] = {"preset": self.preset_name, "architecture": asdict(self.architecture)}

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
        return gathered_state_dict(self.model, sharded=self.device_mesh is not None)

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        """The self-contained model (VQ and text tower included), for `load_toklip`: a run from a cache
        gets its VQ and text tower from their sources, as a live run's were."""
        state = self.full_model_state_dict()
        if self.cached:
            whole = self._build_model(student_only=False)
            init_from_teacher(whole, self._teacher_state())
            load_state_dict_strict(whole, {**whole.state_dict(), **state}, where="the trained student of a cached run")
            state = {k: v.detach().cpu() for k, v in whole.state_dict().items()}
        return state, toklip_export_metadata(self.architecture, self.preset_name)


INPUTS = ("images", "cache")  # what a step reads: images and captions, or the frozen networks' outputs (data=cache)
CACHED_TARGETS = ("indices", "text_features", "teacher_features", "teacher_tokens")


def batch_size_of(batch: Mapping[str, torch.Tensor]) -> int:
    """Samples in a training batch, live or cached."""
    return len(batch["indices"] if "indices" in batch else batch["image"])
