"""Validation on the data module's evaluation sets, shared by every contrastive training module."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.eval_sets import EvalSet
from ..evaluation.metrics import eval_metric


class EvalSetsValidation:
    """Mixin for a LightningModule with `eval_model` (encode_image/encode_text, normalize=...),
    `text_tokenizer` and an `eval_metrics` ModuleDict: logs `val/<set>/top1`, `top5` for zero-shot
    sets and `val/<set>/i2t_R@K`, `t2i_R@K` for retrieval sets."""

    def _eval_sets(self) -> dict[str, EvalSet]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return dict(getattr(datamodule, "eval_sets", {}) or {})

    def on_validation_start(self) -> None:
        """Class embeddings and caption embeddings once per run when the text tower is frozen;
        a text tower in training (a teacher's) is re-encoded every validation."""
        text_frozen = not any(p.requires_grad for p in self.eval_model.text.parameters())
        for name, dataset in self._eval_sets().items():
            if name not in self.eval_metrics or not text_frozen:
                self.eval_metrics[name] = eval_metric(self.eval_model, self.text_tokenizer, dataset, self.device)

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = list(self._eval_sets())[dataloader_idx]
        images, targets = batch
        self.eval_metrics[name].update(self.eval_model.encode_image(images, normalize=True), targets)

    def on_validation_epoch_end(self) -> None:
        for name in self._eval_sets():
            metric = self.eval_metrics[name]
            # compute() has already reduced over ranks: sync_dist averages equal values (and keeps Lightning from warning)
            values = {f"val/{name}/{key}": value for key, value in metric.compute().items()}
            self.log_dict(values, add_dataloader_idx=False, sync_dist=True)
            metric.reset()
