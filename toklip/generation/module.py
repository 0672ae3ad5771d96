"""GeneratorModule: trains a TokenGenerator on VQ indices, text-conditional, beside a frozen TokLIP model."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from ..models.factory import load_toklip
from .generator import TokenGenerator


class GeneratorModule(L.LightningModule):
    """A text-conditional TokenGenerator trained on batches of VQ indices (`indices`, (B, h, w)) and the
    frozen text tower's normalised caption embeddings (`text_features`, (B, D)): what a training cache
    (`toklip-cache`, read by `data=cache`) holds for every sample.

    `toklip` is an export of the TokLIP model whose tokens are generated (`load_toklip`): its codebook
    and grid fix the generator's vocabulary and length, and in `codes+toklip` its frozen causal features
    of the indices join the generator's inputs. It is not trained and not checkpointed (re-read from its
    file). `condition_dropout` replaces that share of the captions by the null prompt, for guidance.
    """

    def __init__(
        self,
        toklip: str | os.PathLike,
        *,
        generator: str = "tiny",
        input_mode: str = "codes",
        prefix_tokens: int = 1,
        condition_dropout: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["toklip"])
        self.hparams["toklip"] = os.fspath(toklip)  # a str: checkpoints load with weights_only
        self.toklip = load_toklip(toklip).requires_grad_(False)
        trunk = self.toklip.visual.trunk
        self.generator = TokenGenerator(
            generator, codebook_size=self.toklip.tokenizer.codebook_size, num_tokens=trunk.num_tokens, input_mode=input_mode,
            toklip_width=trunk.spec.width, text_width=self.toklip.embed_dim, prefix_tokens=prefix_tokens,
        )  # fmt: skip

    def toklip_features(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The frozen causal features of indices (B, h, w) in `codes+toklip`, else None."""
        if self.generator.toklip_projection is None:
            return None
        with torch.no_grad():
            return self.toklip.index_features(indices)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        indices = batch["indices"]
        condition = self.generator.drop_condition(batch["text_features"], self.hparams.condition_dropout)
        loss = self.generator.loss(indices.flatten(1), condition, self.toklip_features(indices))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(indices))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        options = self.hparams
        return torch.optim.AdamW(self.generator.parameters(), lr=options.lr, weight_decay=options.weight_decay, betas=tuple(options.betas))

    def train(self, mode: bool = True) -> GeneratorModule:
        super().train(mode)
        self.toklip.eval()  # frozen: a parent's .train() must not switch it
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The generator only: the frozen TokLIP model is re-read from its file."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("toklip.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith("toklip.")}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
