"""Evaluate a TokLIP model on evaluation sets outside a Trainer (what toklip-eval runs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.eval_sets import EvalSet
from .metrics import eval_metric


@torch.no_grad()
def evaluate(
    model,
    eval_sets: Mapping[str, EvalSet],
    text_tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """`<set>/top1`, `<set>/top5` for zero-shot sets, `<set>/i2t_R@K`, `<set>/t2i_R@K` for retrieval."""
    model = model.to(device).eval()
    results: dict[str, float] = {}
    for name, dataset in eval_sets.items():
        metric = eval_metric(model, text_tokenizer, dataset, device)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available())
        for images, targets in tqdm(loader, desc=f"eval {name}", unit="batch"):
            metric.update(model.encode_image(images.to(device, non_blocking=True), normalize=True), targets.to(device))
        results.update({f"{name}/{key}": float(value) for key, value in metric.compute().items()})
    return results
