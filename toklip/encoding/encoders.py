"""What an encode job computes: TokLIP's outputs for downstream models (`toklip-encode`), or a training
cache of the frozen networks' outputs (`toklip-cache`). Each is a LightningModule with a
`predict_step` and a picklable `prepare` that turns a raw sample into its inputs in a loader worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..data.samples import caption_of, image_bytes, label_of, open_image
from ..data.transforms import Transform, eval_transform, seeded_augmentation, train_transform, view_seed
from ..models.toklip import TokLIP
from ..tokenizers.base import index_dtype
from ..training.module import TokLIPModule

FEATURES = ("indices", "tokens", "embedding")


@dataclass(frozen=True)
class PrepareImage:
    """A raw sample -> {"image"}: the evaluation transform (resize, centre crop, normalise)."""

    transform: Transform

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"image": self.transform(open_image(image_bytes(sample)))}


@dataclass(frozen=True)
class PrepareViews:
    """A raw sample -> {"image": K augmented views (K, 3, H, W)}, with "text" (caption tokens) when
    there is a `text_tokenizer`, and "label" (the class id of its `cls`) with `labels`. View v of a
    sample is drawn from (seed, key, v) alone: the same crop in every run, rank and worker."""

    transform: Transform
    text_tokenizer: Any | None
    views: int
    seed: int
    labels: bool = False

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = image_bytes(sample)
        prepared = {}
        if self.text_tokenizer is not None:
            prepared["text"] = self.text_tokenizer([caption_of(sample)])[0]
        if self.labels:
            prepared["label"] = torch.tensor(label_of(sample))
        image = open_image(data)
        crops = []
        for view in range(self.views):
            with seeded_augmentation(view_seed(self.seed, sample["__key__"], view)):
                crops.append(self.transform(image))
        return {"image": torch.stack(crops), **prepared}


class FeatureEncoder(L.LightningModule):
    """Per image: the VQ indices (h, w), the causal per-token features (N, D) in `tokens_dtype` and the
    L2-normalised embedding (D,). The indices come from the fp32 path whatever the trainer's precision."""

    def __init__(self, model: TokLIP, features: Sequence[str] = FEATURES, tokens_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        unknown = set(features) - set(FEATURES)
        if unknown or not features:
            raise ValueError(f"features {sorted(unknown) or '[]'}: choose from {list(FEATURES)}")
        self.model, self.features, self.tokens_dtype = model.eval(), tuple(features), tokens_dtype
        self.index_dtype = index_dtype(model.tokenizer.codebook_size)

    def prepare(self) -> PrepareImage:
        return PrepareImage(eval_transform(self.model.preprocess_cfg))

    def predict_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batch["inputs"] is None:
            return {}
        trunk = self.model.visual.trunk
        encoding = self.model.tokenizer.encode(batch["inputs"]["image"])
        tokens = trunk.features_from_codes(encoding.codes)
        outputs = {
            "indices": encoding.indices.to(self.index_dtype),
            "tokens": tokens.to(self.tokens_dtype),
            "embedding": F.normalize(trunk.pool(tokens).float(), dim=-1),
        }
        return {name: outputs[name].cpu() for name in self.features}


class CacheEncoder(L.LightningModule):
    """A training cache: per sample, for `views` augmented crops, the VQ indices (views, h, w) and the
    teacher's embedding (views, D) (and, with `teacher_tokens`, its patch tokens (views, N, D)), plus the
    caption's normalised text embedding (D,) (`captions=False`: none, for shards without captions). Exactly
    what `TokLIPModule` computes live (`image_targets`, `text_targets`); embeddings stored in `dtype`.
    With `labels`, also each sample's class id (its shard's `cls`: class-conditional generation)."""

    def __init__(
        self,
        module: TokLIPModule,
        *,
        views: int = 4,
        teacher_tokens: bool = False,
        dtype: torch.dtype = torch.float16,
        captions: bool = True,
        labels: bool = False,
    ) -> None:
        super().__init__()
        if views < 1:
            raise ValueError(f"views={views}: at least one view a sample")
        if module.teacher is None:
            raise ValueError("a training cache holds the teacher's embeddings: the model needs a teacher (teacher.model)")
        self.module, self.views, self.teacher_tokens, self.dtype_out = module.eval(), views, teacher_tokens, dtype
        self.captions, self.labels = captions, labels
        self.index_dtype = index_dtype(module.model.tokenizer.codebook_size)

    def prepare(self, crop_scale: Sequence[float], seed: int) -> PrepareViews:
        transform = train_transform(self.module.model.preprocess_cfg, crop_scale)
        return PrepareViews(transform, self.module.text_tokenizer if self.captions else None, self.views, seed, self.labels)

    def predict_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batch["inputs"] is None:
            return {}
        inputs = batch["inputs"]
        images = inputs["image"]
        targets = self.module.image_targets(images.flatten(0, 1), teacher_tokens=self.teacher_tokens)
        outputs = {name: value.unflatten(0, (images.shape[0], self.views)) for name, value in targets.items()}
        if self.captions:
            outputs.update(self.module.text_targets(inputs["text"]))
        stored = {name: value.to(self.index_dtype if name == "indices" else self.dtype_out).cpu() for name, value in outputs.items()}
        return stored | ({"label": inputs["label"].cpu()} if self.labels else {})
