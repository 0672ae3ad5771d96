"""GeneratorModule: trains a TokenGenerator on a training cache's VQ indices, beside a frozen TokLIP model;
`load_generator` reads its export back."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..checkpoints import StateDict, load_state_dict_strict, read_checkpoint, read_sidecar
from ..config import ConfigError, settings_from_group
from ..models.factory import load_toklip
from ..models.toklip import TokLIP
from ..tokenizers.base import codebook_fingerprint
from ..training.callbacks import ExportableModule
from ..training.optim import AdamWCosine
from ..training.strategies import gathered_state_dict, shard_with_fsdp2
from .generator import TokenGenerator

CONDITIONS = ("text", "class")


class GeneratorModule(ExportableModule, L.LightningModule):
    """A TokenGenerator trained with teacher forcing on batches of a training cache (`data=cache`):
    `indices` (B, h, w), and the condition, `text_features` (B, D) (the frozen text tower's normalised
    caption embeddings) or `label` (B,) (class ids: a cache made with `labels=true`).

    `toklip` is an export of the TokLIP model whose tokens are generated (`load_toklip`): its codebook
    and grid fix the generator's vocabulary and length, and in `codes+toklip` its frozen causal features
    of the indices join the generator's inputs. It is neither trained nor checkpointed (it is re-read
    from its file). `condition_dropout` replaces that share of the conditions by the null one (guidance).
    `inputs` is the cache (set by data=cache): the generator reads precomputed indices only.
    """

    export_filename = "generator.safetensors"

    def __init__(
        self,
        toklip: str | os.PathLike,
        *,
        generator: str | Mapping[str, int] = "tiny",
        input_mode: str = "codes",
        condition: str = "text",
        num_classes: int | None = None,
        prefix_tokens: int = 1,
        condition_dropout: float = 0.1,
        optim: Mapping[str, Any] | None = None,
        inputs: str = "cache",
    ) -> None:
        super().__init__()
        if inputs != "cache":
            raise ConfigError(f"model.inputs={inputs!r}: the generator trains on precomputed VQ indices; use data=cache")
        if condition not in CONDITIONS:
            raise ConfigError(f"model.condition={condition!r}: choose {' or '.join(CONDITIONS)}")
        if (condition == "class") != (num_classes is not None):
            raise ConfigError("model.num_classes: give it for condition=class (the number of classes), and only then")
        self.save_hyperparameters(ignore=["toklip"])
        self.hparams["toklip"] = os.fspath(toklip)  # a str: checkpoints load with weights_only
        self.optim = settings_from_group(AdamWCosine, "optim", optim)
        self.toklip = load_toklip(toklip).requires_grad_(False)
        trunk = self.toklip.visual.trunk
        self.generator = TokenGenerator(
            generator, codebook_size=self.toklip.tokenizer.codebook_size, num_tokens=trunk.num_tokens, input_mode=input_mode,
            toklip_width=trunk.spec.width, num_classes=num_classes,
            text_width=self.toklip.embed_dim if condition == "text" else None, prefix_tokens=prefix_tokens,
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        """A training cache must hold this model's tokens and the condition (plain dataloaders of such
        batches are the caller's to check)."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        if not hasattr(datamodule, "check_codebook"):
            raise ConfigError("model=generator reads VQ indices from a training cache: use data=cache (a cache made by toklip-cache)")
        datamodule.check_codebook(codebook_fingerprint(self.toklip.tokenizer.codebook()), self.toklip.image_size)
        if self.generator.condition_kind == "class" and not datamodule.has_labels:
            raise ConfigError("model.condition=class needs class labels: make the cache with labels=true (from the shards' cls)")
        if self.generator.condition_kind == "text" and not datamodule.has_captions:
            raise ConfigError("model.condition=text needs caption embeddings: this cache was made with captions=false")

    def toklip_features(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The frozen causal features of indices (B, h, w) in `codes+toklip`, else None."""
        if self.generator.toklip_projection is None:
            return None
        with torch.no_grad():
            return self.toklip.index_features(indices)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        indices = batch["indices"]
        condition = batch["text_features"] if self.generator.condition_kind == "text" else batch["label"]
        condition = self.generator.drop_condition(condition, self.hparams.condition_dropout)
        loss = self.generator.loss(indices.flatten(1), condition, self.toklip_features(indices))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(indices))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(indices))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.configure(self, self.generator.named_parameters())

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

    def configure_model(self) -> None:
        """FSDP2 (Lightning's ModelParallelStrategy): each Llama layer, then the generator as the root;
        the frozen TokLIP model stays replicated (no gradients)."""
        if self.device_mesh is not None:
            shard_with_fsdp2(self.generator, list(self.generator.backbone.layers), self.device_mesh)

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        """The generator's weights and architecture, and the TokLIP export it generates for (`load_generator`)."""
        state = gathered_state_dict(self.generator, sharded=self.device_mesh is not None)
        codebook = codebook_fingerprint(self.toklip.tokenizer.codebook())
        description = {"generator": json.dumps(self.generator.config()), "toklip": os.path.abspath(self.hparams.toklip)}
        return state, description | {"toklip_codebook_sha256": codebook}


def check_toklip_fits(generator: TokenGenerator, toklip: TokLIP, checkpoint: str | os.PathLike) -> None:
    """The TokLIP model a generator samples with must be the one it was trained on: its codebook (size and,
    where the export records it, SHA-256) and token grid. Another one decodes the indices into other images."""
    grid = toklip.visual.trunk.num_tokens
    recorded = read_sidecar(Path(checkpoint), "generator", "a generator export").get("toklip_codebook_sha256")
    found = {"codebook size": (generator.codebook_size, toklip.tokenizer.codebook_size), "tokens": (generator.num_tokens, grid)}
    if recorded is not None:  # exports before it was recorded: sizes only
        found["codebook SHA-256"] = (recorded[:12], codebook_fingerprint(toklip.tokenizer.codebook())[:12])
    differing = {name: pair for name, pair in found.items() if pair[0] != pair[1]}
    if differing:
        described = "; ".join(f"{name} {trained} there, {given} here" for name, (trained, given) in differing.items())
        raise ConfigError(f"{checkpoint} was trained on another TokLIP model ({described}): give toklip= the one it was trained on")


def load_generator(path: str | os.PathLike) -> tuple[TokenGenerator, str]:
    """A generator export (`GeneratorModule.export`) in eval mode, and the path of its TokLIP export."""
    path = Path(path)
    description = read_sidecar(path, "generator", "is it a generator export, <run>/generator.safetensors?")
    model = TokenGenerator(**json.loads(description["generator"]))
    load_state_dict_strict(model, read_checkpoint(path, source="generator"), where=str(path))
    return model.eval(), description["toklip"]
