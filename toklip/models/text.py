"""Text towers (built by open_clip) and their tokenizers."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.transformer import TextTransformer

TextTokenizer = Callable[[list[str]], torch.Tensor]

# SigLIP2's text transformer: Gemma vocabulary (256000), context 64, 27 layers, last-token pool.
_SIGLIP2_SO400M = "ViT-SO400M-16-SigLIP2-256"

TEXT_TOWERS: dict[str, Callable[[], dict[str, Any]]] = {
    "siglip2_so400m": lambda: open_clip.get_model_config(_SIGLIP2_SO400M)["text_cfg"],
    # A small CLIP-style tower with open_clip's bundled BPE tokenizer, so it works offline.
    "tiny": lambda: {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


def text_config(text: str | dict[str, Any]) -> dict[str, Any]:
    """An open_clip `text_cfg` dict by tower name, or a copy of one given directly."""
    if isinstance(text, str):
        if text not in TEXT_TOWERS:
            raise KeyError(f"unknown text tower {text!r}; available: {', '.join(sorted(TEXT_TOWERS))}")
        return copy.deepcopy(TEXT_TOWERS[text]())
    return copy.deepcopy(dict(text))


def build_text_tower(text: str | dict[str, Any], embed_dim: int) -> TextTransformer:
    return _build_text_tower(embed_dim, text_config(text))


def get_text_tokenizer_for(text: str | dict[str, Any], tokenizer_path: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer a text tower was trained with: list[str] -> (B, context_length) int64.

    Towers with a Hugging Face tokenizer (SigLIP2's Gemma) read it from `tokenizer_path` (a local
    directory) or the existing HF cache; nothing is downloaded.
    """
    cfg = text_config(text)
    context_length = cfg.get("context_length", 77)
    hf_name = cfg.get("hf_tokenizer_name")
    if not hf_name:
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(
            f"the {hf_name} text tokenizer needs the `transformers` and `sentencepiece` packages: pip install 'toklip[siglip]'"
        ) from None
    source = str(tokenizer_path) if tokenizer_path is not None else hf_name
    try:
        return open_clip.tokenizer.HFTokenizer(
            source, context_length=context_length, local_files_only=True, **cfg.get("tokenizer_kwargs", {})
        )  # local_files_only: without it transformers fetches what the cache lacks, unless HF_HUB_OFFLINE is set
    except OSError as err:
        raise FileNotFoundError(
            f"text tokenizer {source!r} is neither a local directory nor in the Hugging Face cache "
            f"(nothing is downloaded); pass tokenizer_path=<a local copy of {hf_name}>: {err}"
        ) from None
