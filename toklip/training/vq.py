"""VQTrainingModule: trains a VQ tokenizer (reconstruction + codebook + commitment): the LlamaGen and
taming families, or any registered tokenizer with a `trainable_codebook`.

toklip's tokenizers are frozen by design; this module unfreezes one to train it (from random init, or
from `tokenizer.checkpoint`) and exports weights that `toklip.build_tokenizer(name, checkpoint=...)` loads. Codes are searched as in `encode` (unit
norm for LlamaGen), the decoder reads them through a straight-through estimator, and codes unused
for `restart_every` steps are re-seeded from the current batch's latents (dead-code restart).

An optional perceptual term compares a frozen CLIP image tower's patch tokens of the reconstruction
and of the image, as LlamaGen's LPIPS term compares VGG features; with the CLIP that TokLIP distils
from, the codes keep what that teacher reads (colour, first of all). Nothing is downloaded: the
tower's weights come from a path or the existing cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import StateDict
from ..config import settings_from_group
from ..distributed import from_rank_zero_, sum_over_ranks_
from ..evaluation.reconstruction import psnr
from ..models.teacher import Teacher, teacher_state_dict
from ..tokenizers import build_tokenizer, register_configured_tokenizer
from .callbacks import ExportableModule
from .optim import AdamWCosine

_TEACHER_PREFIX = "perceptual_teacher."


class VQTrainingModule(ExportableModule, L.LightningModule):
    export_filename = "tokenizer.safetensors"

    def __init__(
        self,
        tokenizer: str | Mapping[str, Any] = "llamagen_tiny",
        *,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        restart_every: int = 50,
        perceptual_weight: float = 0.0,
        perceptual_teacher: str | None = None,
        perceptual_teacher_checkpoint: str | None = None,
        optim: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim = settings_from_group(AdamWCosine, "optim", optim)
        settings = register_configured_tokenizer({"name": tokenizer} if isinstance(tokenizer, str) else tokenizer)
        self.tokenizer_name = settings["name"]
        self.vq = build_tokenizer(self.tokenizer_name, settings["checkpoint"], source="tokenizer.checkpoint").requires_grad_(True)
        self.perceptual_teacher = self._build_perceptual_teacher(perceptual_weight, perceptual_teacher, perceptual_teacher_checkpoint)
        self.register_buffer("last_used", torch.zeros(self.vq.codebook_size, dtype=torch.long), persistent=False)
        self._step_codes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val_codes: list[torch.Tensor] = []
        self._val_psnr: list[torch.Tensor] = []
        self.train()  # Lightning keeps the modes modules are built in: the VQ is built frozen, in eval mode

    def train(self, mode: bool = True) -> VQTrainingModule:
        """The VQ follows `mode` (it is trained here, past VQTokenizer.train's eval pin); the teacher stays in eval."""
        super().train(mode)
        nn.Module.train(self.vq, mode)
        return self

    @staticmethod
    def _build_perceptual_teacher(weight: float, model: str | None, checkpoint: str | None) -> Teacher | None:
        if weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {weight}")
        if (weight > 0) != (model is not None):
            raise ValueError(
                f"perceptual_weight={weight} and perceptual_teacher={model!r}: a perceptual term needs both a weight and a teacher, or neither"
            )
        if model is None:
            return None
        return Teacher(model, teacher_state_dict(model, checkpoint, source="perceptual_teacher_checkpoint"))

    def quantize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        indices, z, z_q = self.vq.quantize_latents(self.vq.latents(images))
        codes = z + (z_q - z).detach()  # straight through: the decoder's gradient reaches the encoder
        reconstruction = self.vq.decode_latents(codes.permute(0, 3, 1, 2).contiguous())
        return {
            "reconstruction": reconstruction,
            "indices": indices,
            "latents": z.detach(),
            "codebook": F.mse_loss(z_q, z.detach()),
            "commitment": F.mse_loss(z, z_q.detach()),
        }

    def compute_losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weighted loss terms of a batch, and the quantizer's outputs."""
        out = self.quantize(images)
        losses = {
            "reconstruction": F.l1_loss(out["reconstruction"], images) + F.mse_loss(out["reconstruction"], images),
            "codebook": self.hparams.codebook_weight * out["codebook"],
            "commitment": self.hparams.commitment_weight * out["commitment"],
        }
        if self.perceptual_teacher is not None:
            with torch.no_grad():
                target = self.perceptual_teacher.patch_tokens(images)
            losses["perceptual"] = self.hparams.perceptual_weight * F.mse_loss(
                self.perceptual_teacher.patch_tokens(out["reconstruction"]), target
            )
        return losses, out

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        losses, out = self.compute_losses(images)
        total = sum(losses.values())
        size = images.shape[0]
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in losses.items()}, batch_size=size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=size)
        self.log("train/psnr", psnr(out["reconstruction"].detach(), images), prog_bar=True, batch_size=size)
        used = torch.unique(out["indices"])
        self.log("train/codebook_usage", used.numel() / self.vq.codebook_size, batch_size=size)
        self._step_codes = (used, out["latents"])
        return total

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the optimizer step (the codebook must not change under autograd's feet)."""
        self.restart_dead_codes(*self._step_codes, step=self.global_step)

    @torch.no_grad()
    def restart_dead_codes(self, used: torch.Tensor, latents: torch.Tensor, *, step: int) -> torch.Tensor:
        """Re-seed the codes no rank has used for `restart_every` steps; returns their indices.

        DDP ranks must keep one codebook: usage is summed over ranks, and the new vectors are drawn
        from rank 0's latents and broadcast.
        """
        hits = torch.zeros_like(self.last_used)
        hits[used] = 1
        self.last_used[sum_over_ranks_(hits) > 0] = step
        dead = torch.nonzero(step - self.last_used > self.hparams.restart_every).flatten()
        if dead.numel() == 0:
            return dead
        pool = latents.reshape(-1, latents.shape[-1])
        picks = pool[torch.randint(pool.shape[0], (dead.numel(),), device=pool.device)]
        self.vq.trainable_codebook()[dead] = from_rank_zero_(picks + 0.01 * torch.randn_like(picks))
        self.last_used[dead] = step
        return dead

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images = batch[0]
        out = self.quantize(images)
        self._val_psnr.append(psnr(out["reconstruction"], images).expand(images.shape[0]))
        self._val_codes.append(out["indices"].flatten())

    def on_validation_epoch_end(self) -> None:
        if self._val_psnr:
            self.log("val/psnr", torch.cat(self._val_psnr).mean(), sync_dist=True)
            self.log("val/codebook_usage", torch.unique(torch.cat(self._val_codes)).numel() / self.vq.codebook_size, sync_dist=True)
        self._val_psnr, self._val_codes = [], []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The perceptual teacher is frozen and re-read from its file: it is not saved."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(_TEACHER_PREFIX)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith(_TEACHER_PREFIX)}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.configure(self, self.vq.named_parameters())

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        """The tokenizer's weights: `toklip.build_tokenizer(name, checkpoint=out)` loads them."""
        return {k: v.detach().cpu() for k, v in self.vq.state_dict().items()}, {"tokenizer": self.tokenizer_name}
