"""ComprehensionModule: trains a VisualLanguageModel in LLaVA's two stages; `load_comprehension` reads its export.

- `align`: the projector alone (and the visual input's own embeddings) learns to caption, the LM frozen;
- `instruct`: projector and LM learn to answer (the whole LM, or LoRA adapters through peft), starting
  from an `align` export (`init`).
The loss is the LM's next-token loss on answer tokens only. Frozen weights (the visual encoder, an LM
that does not train, LoRA's base) are re-read from their files: checkpoints and exports hold only
the trained parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..checkpoints import LoadReport, StateDict, compare_state_dict, read_checkpoint, read_sidecar
from ..config import ConfigError, group_settings, settings_from_group
from ..training.callbacks import ExportableModule
from ..training.optim import AdamWCosine
from ..training.strategies import gathered_state_dict, shard_with_fsdp2
from .language_model import load_language_model
from .model import VisualLanguageModel
from .vision import build_visual_input

STAGES = ("align", "instruct")
LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def apply_lora(language_model: nn.Module, lora: Mapping[str, Any]) -> nn.Module:
    """LoRA adapters on the LM through peft (its base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("llm.lora needs peft: pip install 'toklip[comprehension]'") from None
    settings = group_settings("llm.lora", lora, **LORA_DEFAULTS)
    config = LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(language_model, config)


def build_model(
    llm: Mapping[str, Any], vision_input: Mapping[str, Any], projector: Mapping[str, Any], image_size: int, stage: str
) -> VisualLanguageModel:
    """The model of a stage, its trainable parameters marked (`requires_grad`); everything else frozen."""
    if stage not in STAGES:
        raise ConfigError(f"model.stage={stage!r}: choose {' or '.join(STAGES)}")
    language_model, tokenizer = load_language_model(llm["path"])
    projector = group_settings("projector", projector, kind="mlp2x_gelu")["kind"]
    model = VisualLanguageModel(build_visual_input(vision_input, image_size), language_model, tokenizer, projector)
    model.language_model.requires_grad_(stage == "instruct" and not llm.get("lora"))
    if stage == "instruct" and llm.get("lora"):
        model.language_model = apply_lora(model.language_model, llm["lora"])  # marks the adapters trainable
    if llm.get("gradient_checkpointing"):
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trained_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> StateDict:
    """The entries of `state` (default: the model's) that are trained parameters."""
    state = model.state_dict() if state is None else state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def load_trained(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load exactly the trained parameters: a key the model does not train, a trained one absent, or
    one of another shape, is an error."""
    expected = set(trained_state_dict(model))
    report = LoadReport(
        missing=sorted(expected - set(state)),
        unexpected=sorted(set(state) - expected),
        mismatched=compare_state_dict(model, state).mismatched,
    )
    if not report.ok:
        raise ValueError(f"{where}: does not fit this model:\n{report.describe(limit=8)}")
    model.load_state_dict(state, strict=False)


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The LM's transformer layers (its `_no_split_modules` classes): FSDP's wrap units."""
    names = set(getattr(language_model, "_no_split_modules", None) or ())
    return [m for m in language_model.modules() if type(m).__name__ in names]


class ComprehensionModule(ExportableModule, L.LightningModule):
    """One stage of LLaVA training over batches of `image`, `input_ids`, `labels`, `attention_mask`
    (`toklip.comprehension.data`). `llm`: {path, gradient_checkpointing, lora}; `vision_input`: {kind, ...}
    (`toklip.comprehension.vision`); `init`: an earlier stage's export whose trained weights start this one."""

    export_filename = "comprehension.safetensors"

    def __init__(
        self,
        llm: Mapping[str, Any],
        vision_input: Mapping[str, Any],
        projector: Mapping[str, Any] | None = None,
        *,
        image_size: int,
        stage: str = "instruct",
        init: str | os.PathLike | None = None,
        optim: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        llm = group_settings("llm", llm, path=None, gradient_checkpointing=False, lora=None)
        if llm["path"] is None:
            raise ConfigError("llm.path: the directory of a Hugging Face causal LM (config.json, weights, tokenizer)")
        projector = dict(projector or {})
        self.save_hyperparameters({"llm": llm, "vision_input": dict(vision_input), "projector": projector, "image_size": image_size,
                                   "stage": stage, "init": None if init is None else os.fspath(init)})  # fmt: skip
        self.optim = settings_from_group(AdamWCosine, "optim", optim)
        self.model = build_model(llm, vision_input, projector, image_size, stage)
        if init is not None:
            self.start_from(Path(init))

    def start_from(self, path: Path) -> None:
        """The trained weights of an earlier stage's export (its projector, a codes embedding, an LM this run
        trains too); an export holding weights this run would not train, and so drop, is refused."""
        description = read_description(path)
        trained_with, ours = description["vision_input"]["kind"], self.hparams.vision_input.get("kind")
        if trained_with != ours:
            raise ConfigError(f"model.init={path}: it was trained with vision_input={trained_with}, this run reads {ours}")
        state = read_checkpoint(path, source="model.init")
        trained = set(trained_state_dict(self.model))
        missing = sorted(k for k in trained - set(state) if not k.startswith("language_model."))  # an align export has no LM
        if missing:
            raise ConfigError(f"model.init={path}: lacks {', '.join(missing[:8])}")
        untrained_here = sorted(set(state) - trained)  # e.g. an instruct export's LM, into LoRA or an align run
        if untrained_here:
            raise ConfigError(
                f"model.init={path}: its {description['stage']} stage trained {len(untrained_here)} weight(s) that this run does "
                f"not train and would drop ({', '.join(untrained_here[:4])}, ...): give the llm.lora and model.stage it was trained with"
            )
        mismatched = compare_state_dict(self.model, state).mismatched
        if mismatched:
            sizes = LoadReport(mismatched=mismatched).describe(limit=8)
            raise ConfigError(f"model.init={path}: was trained with other sizes than this run's: {sizes}")
        self.model.load_state_dict(state, strict=False)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        size = len(batch["image"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "data_metrics"):
            self.log_dict(datamodule.data_metrics(), batch_size=size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.configure(self, ((n, p) for n, p in self.model.named_parameters() if p.requires_grad))

    def train(self, mode: bool = True) -> ComprehensionModule:
        super().train(mode)
        if self.hparams.stage == "align":
            self.model.language_model.eval()  # frozen in this stage
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The trained parameters only: the rest is re-read from its files."""
        trained = {f"model.{k}" for k in trained_state_dict(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    def configure_model(self) -> None:
        """FSDP2 (Lightning's ModelParallelStrategy): each LM layer, then the whole model as the root;
        the frozen visual encoder stays replicated."""
        if self.device_mesh is not None:
            frozen = {p for p in self.model.vision.parameters() if not p.requires_grad}
            shard_with_fsdp2(self.model, decoder_layers(self.model.language_model), self.device_mesh, frozen)

    def export_contents(self) -> tuple[StateDict, dict[str, str]]:
        """The trained parameters, and how to rebuild the rest (`load_comprehension`)."""
        state = trained_state_dict(self.model, gathered_state_dict(self.model, sharded=self.device_mesh is not None))
        # Absolute paths: the export loads from any directory.
        llm = {**self.hparams.llm, "path": os.path.abspath(self.hparams.llm["path"])}
        vision_input = dict(self.hparams.vision_input)
        if vision_input.get("checkpoint") is not None:
            vision_input["checkpoint"] = os.path.abspath(vision_input["checkpoint"])
        description = {key: self.hparams[key] for key in ("projector", "image_size", "stage")} | {"llm": llm, "vision_input": vision_input}
        return state, {"comprehension": json.dumps(description)}


def read_description(path: Path) -> dict[str, Any]:
    """What a comprehension export's sidecar records: the LM's path, the visual input, projector, image size, stage."""
    return json.loads(
        read_sidecar(path, "comprehension", "is it a comprehension export, <run>/comprehension.safetensors?")["comprehension"]
    )


def load_comprehension(path: str | os.PathLike, device: str | torch.device = "cpu") -> VisualLanguageModel:
    """A comprehension export (`ComprehensionModule.export`) in eval mode: the LM and the visual
    encoder re-read from the paths it records, its trained weights loaded exactly."""
    path = Path(path)
    description = read_description(path)
    model = build_model(
        description["llm"], description["vision_input"], description["projector"], description["image_size"], description["stage"]
    )
    load_trained(model, read_checkpoint(path, source="comprehension"), where=str(path))
    return model.requires_grad_(False).eval().to(device)
