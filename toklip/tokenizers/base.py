"""The frozen VQ tokenizer interface that every family implements."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import LoadReport, StateDict, describe_source, find_state_dict, load_state_dict_strict, read_checkpoint


@dataclass(frozen=True)
class VQEncoding:
    """What `VQTokenizer.encode` returns."""

    indices: torch.Tensor  # (B, h, w) int64, raster order
    codes: torch.Tensor  # (B, h, w, C) float: the vectors the token encoder consumes


# On the CPU the (N, K) distance matrix of a batch is tens of MB, and filling such fresh buffers costs
# more than the arithmetic: searched a few rows at a time (temporaries of 2^18 floats) it is ~4x faster.
CPU_DISTANCE_CHUNK = 2**18


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (L2) for every row of `vectors` (N, C) -> (N,).

    The expanded form |z|^2 + |e|^2 - 2 z.e is the one the released tokenizers use; the same
    rounding keeps near-ties resolved the same way, so indices match theirs exactly. Splitting the
    rows into chunks changes no element's arithmetic, only the size of the temporaries.
    """
    codebook_norms = codebook.pow(2).sum(dim=1)
    rows = max(1, CPU_DISTANCE_CHUNK // codebook.shape[0]) if vectors.device.type == "cpu" else max(1, vectors.shape[0])
    return torch.cat([
        (chunk.pow(2).sum(dim=1, keepdim=True) + codebook_norms - 2 * torch.einsum("nc,ck->nk", chunk, codebook.t())).argmin(dim=1)
        for chunk in vectors.split(rows)
    ])  # fmt: skip


class VQTokenizer(nn.Module):
    """A frozen image tokenizer: images in [-1, 1] -> codebook indices and code vectors.

    Frozen three ways: parameters never require grad, the module stays in eval mode whatever its
    parent asks, and encode/lookup/decode run under no_grad. They also run in fp32 with autocast
    off, so the tokens of an image do not depend on the training precision (a precomputed token
    cache and a live bf16 run agree). A tokenizer cast with `.to(torch.bfloat16)` runs its
    convolutions in bf16 on purpose; the nearest-code search stays in fp32.

    Subclasses provide `latents` (images -> pre-quantisation latents), `codebook` (the vectors the
    search and `lookup` use) and `decode_latents`; and call `_freeze()` at the end of `__init__`.
    A family whose checkpoints use other key names overrides `convert_state_dict`; the globals its
    checkpoints may pickle go in `checkpoint_globals` (everything else is refused).
    """

    checkpoint_globals: ClassVar[tuple[Any, ...]] = ()
    checkpoint_weights_keys: ClassVar[tuple[str, ...]] = ("ema", "model", "state_dict")  # where weights sit, first found wins

    # Images enter in [-1, 1]: the normalisation a data pipeline applies to [0, 1] pixels.
    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, codebook_size: int, code_dim: int, downsample: int, l2_normalized: bool) -> None:
        super().__init__()
        self._codebook_size = codebook_size
        self._code_dim = code_dim
        self._downsample = downsample
        self.l2_normalized = l2_normalized

    @property
    def codebook_size(self) -> int:
        """Number of codes (indices lie in [0, codebook_size))."""
        return self._codebook_size

    @property
    def code_dim(self) -> int:
        """Width C of a code vector."""
        return self._code_dim

    @property
    def downsample(self) -> int:
        """Pixels per token along each side."""
        return self._downsample

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an image size (an int means a square image)."""
        return token_grid(image_size, self.downsample)

    def convert_state_dict(self, state_dict: StateDict) -> tuple[StateDict, list[str]]:
        """A checkpoint's state dict in this module's key layout, and the keys dropped on purpose."""
        return state_dict, []

    def load_weights(self, path: str | os.PathLike, *, source: str | None = None) -> LoadReport:
        """Load a checkpoint of this family strictly (every key or none); `source` names where the path came from."""
        where = describe_source(path, source)
        raw = read_checkpoint(path, source=source, allowed_globals=self.checkpoint_globals)
        state_dict, ignored = self.convert_state_dict(find_state_dict(raw, self.checkpoint_weights_keys, where=where))
        return load_state_dict_strict(self, state_dict, where=where, ignored=ignored)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VQTokenizer:
        # A frozen tokenizer ignores train(): its parent's .train() must not switch it out of eval.
        return super().train(False)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> pre-quantisation latents (B, C, h, w)."""
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        """The (codebook_size, C) vectors the search and `lookup` use (unit-norm where `l2_normalized`)."""
        raise NotImplementedError

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, C, h, w) -> images (B, 3, H, W), roughly in [-1, 1]."""
        raise NotImplementedError

    def trainable_codebook(self) -> nn.Parameter:
        """The parameter whose rows are the codes, which toklip's VQ training re-seeds when codes die.
        Only a tokenizer that has one can be trained by it (`model=vq`); any can be used frozen."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable codebook: toklip's VQ training cannot train it")

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        self.grid(tuple(images.shape[-2:]))

    def quantize_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) -> indices (B, h, w), the searched vectors z and their nearest codes z_q
        (both (B, h, w, C)). The search is not differentiable; z and z_q are (VQ training uses them)."""
        z = latents.permute(0, 2, 3, 1).contiguous()
        if self.l2_normalized:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook().to(z.dtype)
        indices = self.search_codes(z.reshape(-1, self.code_dim).detach(), codebook.detach()).view(z.shape[:-1])
        return indices, z, codebook[indices]

    def search_codes(self, vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """The code of each row of `vectors` (N, C) in `codebook` (K, C) -> (N,): the nearest (L2) for VQ."""
        return nearest_code(vectors, codebook)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> VQEncoding:
        """(B, 3, H, W) in [-1, 1] -> indices (B, h, w) and codes (B, h, w, C)."""
        self._check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            indices, z, z_q = self.quantize_latents(self.latents(images.to(self.dtype)).float())
        return VQEncoding(indices=indices, codes=self.encoded_codes(z, z_q))

    def encoded_codes(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """The code vectors `encode` returns, from the searched vectors z and their codes z_q. LlamaGen's
        straight-through form z + (z_q - z): the same vectors as lookup(indices) up to one rounding, and
        bit-identical to what the release feeds on."""
        return z + (z_q - z)

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., C) for indices (...): the token-cache path, no image needed."""
        check_indices(indices, self.codebook_size)
        with torch.autocast(indices.device.type, enabled=False):
            return self.codebook().float()[indices]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        codes = self.lookup(indices)
        with torch.autocast(indices.device.type, enabled=False):
            images = self.decode_latents(codes.permute(0, 3, 1, 2).to(self.dtype).contiguous())
        return images.float().clamp(-1, 1)


def token_grid(image_size: int | tuple[int, int], downsample: int) -> tuple[int, int]:
    """Token grid (h, w) of an image size (an int means a square image) at `downsample` pixels a token."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % downsample or width % downsample:
        raise ValueError(f"image size {height}x{width} is not a multiple of the tokenizer's downsample factor {downsample}")
    return height // downsample, width // downsample


def check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    """Indices must be int64 and, on the CPU, lie in [0, codebook_size). On a GPU the range check
    would sync every step, and an out-of-range index there already fails loudly (a device assertion)."""
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.device.type == "cpu" and indices.numel() and (indices.min() < 0 or indices.max() >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{indices.min()}, {indices.max()}]")


class CodebookLookup(nn.Module):
    """A VQ tokenizer reduced to its code vectors: all that training from cached indices reads. Its
    encoder and decoder are never built, so it cannot encode or decode images. Its table is not part
    of a state dict: checkpoints keep the layout of the whole tokenizer's (which they leave out too)."""

    def __init__(self, tokenizer: VQTokenizer) -> None:
        super().__init__()
        self.register_buffer("table", tokenizer.codebook().detach().float().clone(), persistent=False)
        self.codebook_size, self.code_dim, self.downsample = tokenizer.codebook_size, tokenizer.code_dim, tokenizer.downsample
        self.input_mean, self.input_std = tokenizer.input_mean, tokenizer.input_std

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        return token_grid(image_size, self.downsample)

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., C) for indices (...), equal to the whole tokenizer's `lookup`."""
        check_indices(indices, self.codebook_size)
        return self.table[indices]

    def encode(self, images: torch.Tensor) -> VQEncoding:
        raise TypeError("this model was built to train from cached VQ indices: it has no VQ encoder (load the export instead)")


def index_dtype(codebook_size: int) -> torch.dtype:
    """The smallest signed integer type that holds every index (int16 up to 32768 codes, else int32)."""
    return torch.int16 if codebook_size <= 2**15 else torch.int32


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """SHA-256 of the fp32 code vectors: names the codebook that stored indices refer to."""
    return hashlib.sha256(codebook.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
