"""The TokLIP model: a token encoder over frozen VQ codes, a frozen text tower, a logit scale."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from torch import nn

from ..data.transforms import preprocess_config
from ..tokenizers import CodebookLookup, VQTokenizer
from .backbones import BackboneSpec
from .text import build_text_tower
from .token_encoder import CausalCache, TokenEncoder

TOKENIZER_PREFIX = "visual.trunk.vq."  # where a TokLIP state dict keeps its frozen VQ tokenizer


class TokLIPVisual(nn.Module):
    """Holds the trunk at `visual.trunk`, the release's layout (open_clip's TimmModel with no head)."""

    def __init__(self, trunk: TokenEncoder) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)


class TokLIP(nn.Module):
    """Image side: VQ codes -> causal token encoder -> MAP pool. Text side: an open_clip text tower.

    The image embedding is the pooled trunk output itself (width = embed dim, no projection).
    The text tower is frozen three ways, as in the release: no grad, eval mode, no_grad calls.
    The student alone (what training from a cache needs: `build_toklip_from(..., student_only=True)`)
    has a `CodebookLookup` for its tokenizer and no text tower (`text=None`).
    """

    def __init__(
        self,
        tokenizer: VQTokenizer | CodebookLookup,
        backbone: BackboneSpec,
        image_size: int,
        text: str | dict[str, Any] | None,
        init_logit_scale: float = math.log(10),
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.text_spec = text  # the tower's name (or config): its tokenizer comes from it
        self.visual = TokLIPVisual(TokenEncoder(tokenizer, backbone, tokenizer.grid(image_size)))
        self.text = None if text is None else build_text_tower(text, embed_dim=backbone.width).requires_grad_(False).eval()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # The release drops the bias (a softmax loss leaves it unused, which breaks DDP); SigLIP uses it.
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    @property
    def tokenizer(self) -> VQTokenizer:
        """The frozen VQ tokenizer whose codes the trunk reads."""
        return self.visual.trunk.vq

    @property
    def embed_dim(self) -> int:
        """Width of the image and text embeddings (the trunk's width: there is no projection)."""
        return self.visual.trunk.spec.width

    @property
    def preprocess_cfg(self) -> PreprocessCfg:
        """What the data pipeline must produce: the VQ's [-1, 1] input at the model's resolution."""
        return preprocess_config(self.image_size, self.tokenizer.input_mean, self.tokenizer.input_std)

    @property
    def context_length(self) -> int:
        """Tokens a caption is padded or cut to."""
        return self.text.context_length

    def _maybe_normalize(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        return F.normalize(x, dim=-1) if normalize else x

    def token_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> causal per-token semantic features (B, N, D)."""
        return self.visual.trunk.features_from_codes(self.tokenizer.encode(images).codes)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> image embeddings (B, D), L2-normalised with `normalize`."""
        return self._maybe_normalize(self.visual(images), normalize)

    def encode_indices(
        self, indices: torch.Tensor, normalize: bool = False, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image embedding (B, D) from VQ indices (B, h, w) alone: the token-cache path, no VQ encoder
        run; with `return_tokens`, also the per-token features (B, N, D). What training steps run."""
        tokens = self.index_features(indices)
        embedding = self._maybe_normalize(self.visual.trunk.pool(tokens), normalize)
        return (embedding, tokens) if return_tokens else embedding

    def index_features(self, indices: torch.Tensor) -> torch.Tensor:
        """VQ indices (B, h, w) -> causal per-token features (B, N, D): `token_features` from the codes alone."""
        return self.visual.trunk.features_from_codes(self.tokenizer.lookup(indices))

    def extend_indices(self, indices: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """The causal features (B, n, D) of the next n VQ indices (B, n) after those `cache` holds (start
        from `CausalCache()`): `token_features` a few tokens at a time, as a generator samples them."""
        return self.visual.trunk.extend(self.tokenizer.lookup(indices), cache)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (B, L) from the model's text tokenizer -> text embeddings (B, D) (the frozen tower)."""
        if self.text is None:
            raise TypeError("this model was built to train from cached text embeddings: it has no text tower (load the export instead)")
        return self._maybe_normalize(self.text(tokens), normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, return_tokens: bool = False) -> dict[str, torch.Tensor | None]:
        """Normalised features and the logit scale/bias, as open_clip's `output_dict=True`;
        with `return_tokens`, also the per-token features (`image_tokens`, B x N x D)."""
        trunk = self.visual.trunk
        token_features = trunk.features_from_codes(self.tokenizer.encode(images).codes)
        out = {
            "image_features": F.normalize(trunk.pool(token_features), dim=-1),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }
        if return_tokens:
            out["image_tokens"] = token_features
        return out

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trunk (without the VQ) and logit scale/bias: what TokLIP trains. The text tower is frozen."""
        return {name: p for name, p in self.named_parameters() if not name.startswith(("text.", TOKENIZER_PREFIX))}

    def train(self, mode: bool = True) -> TokLIP:
        super().train(mode)
        if self.text is not None:
            self.text.eval()  # frozen: a parent's .train() must not switch it
        return self
