"""How good are generated images, with nothing downloaded: Frechet distance in a feature space the user
supplies (torchmetrics), CLIP-score against the prompt, and a zero-shot classifier's accuracy on the
samples of class prompts. Images arrive in [0, 1]; each feature space normalises them its own way."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from ..data.eval_sets import load_image
from ..data.transforms import eval_transform, preprocess_config


class ImageEmbedding(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> a model's image embeddings (`encode_image`), resized to its
    input size and normalised with its mean and std: a Frechet distance's feature space (the teacher's
    or TokLIP's embedding)."""

    def __init__(self, model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model, self.image_size = model.eval(), image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp(0, 1)
        return self.model.encode_image((images - self.mean) / self.std).float()


def frechet_distance_metric(
    feature: nn.Module | None = None, inception_weights: str | os.PathLike | None = None
) -> FrechetInceptionDistance:
    """torchmetrics' Frechet distance over `feature` (a module: [0, 1] images -> (N, D)), or over
    Inception-v3's pool features read from `inception_weights` (torch-fidelity's FID weights file; needs
    the torch-fidelity package). Update with images in [0, 1]."""
    if (feature is None) == (inception_weights is None):
        raise ValueError("give a feature module, or inception_weights (a path), one of them")
    if feature is not None:
        return FrechetInceptionDistance(feature=feature, normalize=True)
    if not os.path.isfile(inception_weights):
        raise FileNotFoundError(f"inception_weights={inception_weights}: no such file (nothing is downloaded)")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=os.fspath(inception_weights))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"Inception features need torch-fidelity (pip install torch-fidelity): {err}") from None


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP-score per pair: 100 x max(cos(image, text), 0) (torchmetrics' and Hessel et al.'s form, w = 100)."""
    return 100 * F.cosine_similarity(image_features.float(), text_features.float(), dim=-1).clamp(min=0)


class SampleScorer:
    """Scores of generated images (in [0, 1]) by one CLIP-style model (`encode_image`, `encode_text`:
    a teacher, or TokLIP itself) whose inputs are `image_size` px normalised by `mean` and `std`:
    Frechet distance in its image embedding (or Inception's, from `inception_weights`), CLIP-score
    with prompts, and its zero-shot accuracy on samples of class prompts."""

    def __init__(
        self,
        model: nn.Module,
        text_tokenizer: Callable[[list[str]], torch.Tensor],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        inception_weights: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """`device`: where the model is, and where every score is computed (images move there in batches)."""
        self.model, self.text_tokenizer, self.inception_weights, self.device = model.eval(), text_tokenizer, inception_weights, device
        self.embedding = ImageEmbedding(model, image_size, mean, std).to(device)

    @torch.no_grad()
    def frechet_distance(self, real: torch.Tensor | Iterable[torch.Tensor], generated: torch.Tensor, batch_size: int = 256) -> float:
        """FD between real images (a tensor, or batches of them) and generated ones."""
        metric = frechet_distance_metric(None if self.inception_weights else self.embedding, self.inception_weights).to(self.device)
        for batch in real.split(batch_size) if isinstance(real, torch.Tensor) else real:
            metric.update(batch.to(self.device), real=True)
        for batch in generated.split(batch_size):
            metric.update(batch.to(self.device), real=False)
        return float(metric.compute())

    @torch.no_grad()
    def clip_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-score of each image with its prompt."""
        texts = self.model.encode_text(self.text_tokenizer(list(prompts)).to(self.device), normalize=True)
        return clip_score(self.embedding(images.to(self.device)), texts)

    @torch.no_grad()
    def zeroshot_predictions(
        self, images: torch.Tensor, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]
    ) -> torch.Tensor:
        """The class (N,) the zero-shot classifier (classnames x templates) gives each image."""
        classifier = build_zero_shot_classifier(
            self.model, self.text_tokenizer, classnames, templates, num_classes_per_batch=10, device=self.device
        )
        return (F.normalize(self.embedding(images.to(self.device)), dim=-1) @ classifier).argmax(-1).cpu()

    def zeroshot_accuracy(
        self, images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]
    ) -> float:
        """Top-1 accuracy of the zero-shot classifier on images of those classes."""
        return float(self.zeroshot_predictions(images, classnames, templates).eq(labels).float().mean())


def image_batches(folder: str | os.PathLike, image_size: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Every image under `folder` (recursively), resized and centre-cropped to `image_size`, in [0, 1],
    in batches (a reference set may be far larger than memory)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"{folder}: a Frechet distance needs at least 2 reference images, found {len(files)}")
    transform = eval_transform(preprocess_config(image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    for start in tqdm(range(0, len(files), batch_size), desc="reference images", unit="batch"):
        yield torch.stack([load_image(path, transform) for path in files[start : start + batch_size]])


@torch.no_grad()
def teacher_forced_nll(
    generator: nn.Module, toklip: nn.Module, indices: torch.Tensor, conditions: torch.Tensor, batch_size: int = 64
) -> float:
    """Mean negative log-likelihood (nats a token) of real images' VQ indices (N, h, w) under their
    conditions, by teacher forcing: how well the generator models held-out images, apart from sampling."""
    total = 0.0
    for batch, condition in zip(indices.split(batch_size), conditions.split(batch_size)):
        features = toklip.index_features(batch) if generator.toklip_projection is not None else None
        logits = generator(batch.flatten(1), condition, features)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch.flatten(), reduction="sum"))
    return total / indices.numel()
