"""From conditions to images: prompts embedded by the TokLIP model's frozen text tower, indices sampled
by a TokenGenerator in batches, decoded by the frozen VQ decoder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from ..config import ConfigError
from ..models.text import get_text_tokenizer_for
from ..models.toklip import TokLIP
from .generator import TokenGenerator


@dataclass(frozen=True)
class SamplingSettings:
    """How indices are drawn: classifier-free guidance scale (None: none), temperature, top-k, top-p."""

    guidance_scale: float | None = 3.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature={self.temperature}: expected a value above 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sampling.top_k={self.top_k}: expected 1 or more, or null (no top-k)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p}: expected a value in (0, 1], or null (no top-p)")


@torch.no_grad()
def prompt_embeddings(toklip: TokLIP, prompts: Sequence[str], tokenizer_path: str | None = None) -> torch.Tensor:
    """The normalised text embeddings (N, D) of prompts: a text-conditional generator's conditions, as
    the training cache holds captions'."""
    tokenizer = get_text_tokenizer_for(toklip.text_spec, tokenizer_path)
    return toklip.encode_text(tokenizer(list(prompts)), normalize=True)


@torch.no_grad()
def sample_images(
    generator: TokenGenerator,
    toklip: TokLIP,
    conditions: torch.Tensor,
    settings: SamplingSettings = SamplingSettings(),
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, h, w) and decoded images (N, 3, H, W) in [0, 1], one per condition (class ids (N,)
    or prompt embeddings (N, D)), drawn from `seed` alone: the same seed gives the same images."""
    grid = toklip.visual.trunk.grid
    rng = torch.Generator(conditions.device).manual_seed(seed)
    indices, images = [], []
    for batch in tqdm(conditions.split(batch_size), desc="sampling", unit="batch", disable=not progress):
        drawn = generator.generate(
            batch, toklip=toklip, guidance_scale=settings.guidance_scale, temperature=settings.temperature,
            top_k=settings.top_k, top_p=settings.top_p, generator=rng,
        ).view(len(batch), *grid)  # fmt: skip
        indices.append(drawn)
        images.append(toklip.tokenizer.decode(drawn) * 0.5 + 0.5)  # [-1, 1] -> [0, 1]
    return torch.cat(indices), torch.cat(images)


def condition_tensor(
    generator: TokenGenerator, toklip: TokLIP, prompts: Sequence[str], classes: Sequence[int], tokenizer_path: str | None = None
) -> tuple[torch.Tensor, list[str]]:
    """The generator's conditions and their names: prompts (a text-conditional generator) or class ids
    (a class-conditional one), checked against what it was trained on."""
    if generator.condition_kind == "text":
        if classes or not prompts:
            raise ValueError("this generator is text-conditional: give prompts (and no classes)")
        return prompt_embeddings(toklip, prompts, tokenizer_path), list(prompts)
    if prompts or not classes:
        raise ValueError(f"this generator is class-conditional ({generator.num_classes} classes): give class ids (and no prompts)")
    not_ids = [c for c in classes if not isinstance(c, int) or isinstance(c, bool)]
    if not_ids:
        raise ValueError(f"class ids {not_ids} are not integers")
    outside = [c for c in classes if not 0 <= c < generator.num_classes]
    if outside:
        raise ValueError(f"class ids {outside} are outside 0..{generator.num_classes - 1}")
    return torch.tensor(list(classes)), [f"class {c}" for c in classes]


def save_samples(out: Path, images: torch.Tensor, names: Sequence[str], per_condition: int) -> Path:
    """Each image as `<condition>_<sample>.png`, the grid (a row a condition) as `grid.png`, and
    `samples.json` naming each file's condition; returns the grid."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for number, image in enumerate(images):
        condition, sample = divmod(number, per_condition)
        path = out / f"{condition:04d}_{sample:02d}.png"
        Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)
        records.append({"file": path.name, "condition": names[condition], "sample": sample})
    (out / "samples.json").write_text(json.dumps(records, indent=2) + "\n")
    grid = out / "grid.png"
    save_image(make_grid(images, nrow=per_condition, padding=2, pad_value=1.0), grid)
    return grid
