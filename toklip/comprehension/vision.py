"""What a language model sees of an image: per-token features (B, N, C), from one of three sources.

- `toklip`: the frozen TokLIP model's causal per-token semantic features (the paper's comprehension input);
- `codes`: a learned embedding of the raw VQ indices of the same frozen tokenizer (the VQ-only
  baseline: Chameleon / Emu3 read images so);
- `teacher`: the frozen teacher's patch features (a continuous CLIP encoder: the upper bound).

Every input reads images in the VQ tokenizer's [-1, 1] range at `image_size` (the teacher resizes to
its own size). Frozen weights are re-read from their files and never saved with the model; what trains
is the `codes` embedding and each input's place embedding (`position_embedding`). The frozen encoder's
outputs can be memoised (`memo`: how many images): an image seen again (another epoch, a small training
set) is then not encoded again.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..models.factory import load_toklip
from ..models.teacher import Teacher, teacher_state_dict
from ..preflight import check_targets
from ..tokenizers import build_tokenizer


class FeatureMemo:
    """The frozen encoder's output of up to `capacity` images, keyed by their pixels (least recently used goes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.entries = capacity, OrderedDict()

    def __call__(self, images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        keys = [hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest() for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        if missing:
            for i, encoded in zip(missing, encode(images[missing])):
                self.entries[keys[i]] = encoded
        for key in keys:
            self.entries.move_to_end(key)
        out = torch.stack([self.entries[key] for key in keys])
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return out


class VisualInput(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> features (B, num_tokens, width): a frozen encoder
    (`encode_frozen`), then what trains on its output (`adapt`; nothing by default), plus, with
    `position_embedding`, a learned embedding of each token's place. Every input has one by default, so
    that all three give the LM the same means of finding a place (codes have no other)."""

    kind: str
    width: int
    num_tokens: int

    def __init__(self, image_size: int, memo: int = 0) -> None:
        super().__init__()
        if memo < 0:
            raise ConfigError(f"vision_input.memo={memo}: how many images' features to keep, 0 (none) or more")
        self.image_size = image_size
        self.memo = FeatureMemo(memo) if memo else None
        self.position_embedding: nn.Parameter | None = None

    def _learn_places(self, enabled: bool) -> None:
        """Called once `width` and `num_tokens` are known: the learned place embedding, when asked for."""
        if enabled:
            self.position_embedding = nn.Parameter(torch.randn(self.num_tokens, self.width) * 0.02)

    def encode_frozen(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapt(self, frozen: torch.Tensor) -> torch.Tensor:
        return frozen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.encode_frozen(images) if self.memo is None else self.memo(images, self.encode_frozen)
        features = self.adapt(frozen)
        return features if self.position_embedding is None else features + self.position_embedding.to(features.dtype)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (below this module) of the frozen weights: re-read, never saved."""
        return ()

    def train(self, mode: bool = True) -> VisualInput:
        super().train(mode)
        for prefix in self.frozen_prefixes():
            getattr(self, prefix.rstrip(".")).eval()  # frozen: a parent's .train() must not switch it
        return self


class TokLIPFeatures(VisualInput):
    kind = "toklip"

    def __init__(self, checkpoint: str | os.PathLike, image_size: int, memo: int = 0, position_embedding: bool = True) -> None:
        super().__init__(image_size, memo)
        self.toklip = load_toklip(checkpoint).requires_grad_(False)
        if self.toklip.image_size != image_size:
            raise ValueError(f"vision_input: the TokLIP model {checkpoint} reads {self.toklip.image_size} px images, not {image_size}")
        self.width, self.num_tokens = self.toklip.embed_dim, self.toklip.visual.trunk.num_tokens
        self._learn_places(position_embedding)

    def encode_frozen(self, images: torch.Tensor) -> torch.Tensor:
        return self.toklip.token_features(images)

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("toklip.",)


class CodeEmbedding(VisualInput):
    """A learned embedding of each token's VQ index."""

    kind = "codes"

    def __init__(
        self,
        tokenizer: str,
        checkpoint: str | os.PathLike | None,
        image_size: int,
        width: int,
        memo: int = 0,
        position_embedding: bool = True,
    ) -> None:
        super().__init__(image_size, memo)
        if checkpoint is None:
            raise ValueError("vision_input=codes reads the VQ tokenizer's codes: give its weights (tokenizer.checkpoint)")
        self.vq = build_tokenizer(tokenizer, checkpoint, source="vision_input.checkpoint").requires_grad_(False)
        height, breadth = self.vq.grid(image_size)
        self.width, self.num_tokens = width, height * breadth
        self.embedding = nn.Embedding(self.vq.codebook_size, width)
        self._learn_places(position_embedding)

    def encode_frozen(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(images).indices.flatten(1)

    def adapt(self, frozen: torch.Tensor) -> torch.Tensor:
        return self.embedding(frozen)

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("vq.",)


class TeacherFeatures(VisualInput):
    kind = "teacher"

    def __init__(
        self, model: str, checkpoint: str | os.PathLike | None, image_size: int, memo: int = 0, position_embedding: bool = True
    ) -> None:
        super().__init__(image_size, memo)
        self.teacher = Teacher(model, teacher_state_dict(model, checkpoint, source="vision_input.checkpoint"), where="vision_input")
        trunk = self.teacher.visual.trunk
        self.prefix_tokens = getattr(trunk, "num_prefix_tokens", 0)  # class / register tokens are not patches
        self.width, self.num_tokens = trunk.embed_dim, trunk.patch_embed.num_patches
        self._learn_places(position_embedding)

    def encode_frozen(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.patch_tokens(images)[:, self.prefix_tokens :]

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("teacher.",)


VISUAL_INPUTS: dict[str, type[VisualInput]] = {cls.kind: cls for cls in (TokLIPFeatures, CodeEmbedding, TeacherFeatures)}


def build_visual_input(spec: Mapping[str, Any], image_size: int) -> VisualInput:
    """A visual input from its config: {"kind": toklip | codes | teacher, and that kind's arguments}."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in VISUAL_INPUTS:
        raise ValueError(f"vision_input.kind={kind!r}: choose from {', '.join(VISUAL_INPUTS)}")
    visual_input = VISUAL_INPUTS[kind]
    # Its keys against the class's signature: a typo, or "no" for a switch, is refused by name, not read as on.
    check_targets({"_target_": f"{visual_input.__module__}.{visual_input.__qualname__}", **spec}, "vision_input.")
    try:
        return visual_input(**spec, image_size=image_size)
    except TypeError as err:
        raise ValueError(f"vision_input (kind {kind}): {err}") from None
