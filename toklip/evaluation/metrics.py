"""Zero-shot classification and image-text retrieval, as torchmetrics metrics (they sync over ranks).

Zero-shot (open_clip's protocol): a class embedding is the mean of its normalised prompt embeddings,
re-normalised; logits = 100 * image @ classes; top-1 and top-5 accuracy.
Retrieval (the reference's): scores = images @ texts.T on normalised features; image->text R@K
(`i2t_R@K`, the paper's TR): one of the image's captions is in its top K; text->image R@K (`t2i_R@K`,
IR): the caption's image is in its top K.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat

from ..data.eval_sets import EvalSet, ZeroShotSet

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def zeroshot_classifier(
    model, tokenizer: Callable[[list[str]], torch.Tensor], dataset: ZeroShotSet, device: torch.device | str
) -> torch.Tensor:
    """(D, classes) class embeddings from the dataset's classnames x templates, through the text tower."""
    return build_zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates, num_classes_per_batch=10, device=device)


@torch.no_grad()
def encode_texts(
    model, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str], device, batch_size: int = 256
) -> torch.Tensor:
    """Normalised text embeddings (N, D), in batches."""
    chunks = [
        model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True) for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


def zeroshot_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return 100.0 * F.normalize(image_features, dim=-1) @ classifier.to(image_features.dtype)


class ZeroShotAccuracy(nn.Module):
    """Top-1/top-5 of image embeddings against a fixed zero-shot classifier (D, classes)."""

    def __init__(self, classifier: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("classifier", classifier, persistent=False)
        self.accuracy = zeroshot_metrics(classifier.shape[1])

    def update(self, image_features: torch.Tensor, labels: torch.Tensor) -> None:
        self.accuracy.update(zeroshot_logits(image_features, self.classifier), labels)

    def compute(self) -> dict[str, torch.Tensor]:
        return self.accuracy.compute()

    def reset(self) -> None:
        self.accuracy.reset()


class RetrievalRecall(Metric):
    """Collects image embeddings by dataset index; `compute` scores them against fixed text embeddings.

    Indices make it exact under distributed samplers, which pad with repeated images.
    """

    full_state_update = False

    def __init__(self, text_features: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> None:
        super().__init__()
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1), persistent=False)
        self.register_buffer("text_to_image", text_to_image.long(), persistent=False)
        self.ks = tuple(ks)
        self.add_state("image_features", default=[], dist_reduce_fx="cat")
        self.add_state("image_index", default=[], dist_reduce_fx="cat")

    def update(self, image_features: torch.Tensor, index: torch.Tensor) -> None:
        self.image_features.append(F.normalize(image_features.float(), dim=-1))
        self.image_index.append(index.long())

    def compute(self) -> dict[str, torch.Tensor]:
        features, index = dim_zero_cat(self.image_features), dim_zero_cat(self.image_index)
        num_images = int(self.text_to_image.max()) + 1
        images = torch.zeros(num_images, features.shape[1], device=features.device, dtype=features.dtype)
        seen = torch.zeros(num_images, dtype=torch.bool, device=features.device)
        images[index], seen[index] = features, True
        texts, text_to_image = self.text_features, self.text_to_image
        if not bool(seen.all()):
            # A partial pass (limit_val_batches, the sanity check): retrieval among the images seen.
            log.info("retrieval over %d of %d images and their captions", int(seen.sum()), num_images)
            kept_texts = seen[text_to_image]
            new_index = torch.cumsum(seen, 0) - 1
            images, texts, text_to_image = images[seen], texts[kept_texts], new_index[text_to_image[kept_texts]]
        return retrieval_recall(images @ texts.T, text_to_image, self.ks)


def retrieval_recall(scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict[str, torch.Tensor]:
    """R@K both ways from scores (images, texts) and each text's image index."""
    num_images, num_texts = scores.shape
    results = {}
    for k in ks:
        top_texts = scores.topk(min(k, num_texts), dim=1).indices  # (images, k)
        results[f"i2t_R@{k}"] = (text_to_image[top_texts] == torch.arange(num_images, device=scores.device)[:, None]).any(1).float().mean()
        top_images = scores.T.topk(min(k, num_images), dim=1).indices  # (texts, k)
        results[f"t2i_R@{k}"] = (top_images == text_to_image[:, None]).any(1).float().mean()
    return results


def eval_metric(model, tokenizer: Callable[[list[str]], torch.Tensor], dataset: EvalSet, device) -> ZeroShotAccuracy | RetrievalRecall:
    """The metric of an evaluation set, its text side (classes or captions) encoded once."""
    if isinstance(dataset, ZeroShotSet):
        return ZeroShotAccuracy(zeroshot_classifier(model, tokenizer, dataset, device)).to(device)
    return RetrievalRecall(encode_texts(model, tokenizer, dataset.texts, device), dataset.text_to_image).to(device)
