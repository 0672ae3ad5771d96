"""The language model: any Hugging Face causal LM and its tokenizer from a local directory, and a tiny
one (a word-level tokenizer and a small Llama) written from a list of texts, for tests and the miniature."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def load_language_model(path: str | os.PathLike, *, source: str = "llm.path") -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer from a local directory (`save_pretrained`'s layout); nothing is
    downloaded. `source` names the config key the path came from, for errors."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{source}={path}: no Hugging Face model there (config.json); give a local directory, nothing is downloaded"
        )
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = load_tokenizer(path, source=source)
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike, *, source: str = "llm.path") -> Any:
    """The LM's tokenizer; it must have an EOS token (answers end with it). Without a pad token, EOS pads."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{source}={path}: its tokenizer has no EOS token, which ends every answer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss alike
    return tokenizer


def words_of(texts: Iterable[str]) -> list[str]:
    """The lower-cased words and punctuation marks of texts, as the tiny tokenizer splits them."""
    return sorted({word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower())})


def make_tiny_language_model(
    directory: str | os.PathLike,
    texts: Iterable[str],
    *,
    width: int = 128,
    depth: int = 2,
    heads: int = 4,
    max_length: int = 512,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny Llama and a word-level tokenizer over the words of `texts`
    (plus the prompt's own words) to `directory`, loadable by `load_language_model`; returns it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from .conversation import PromptFormat

    prompt = PromptFormat()
    vocabulary = [*SPECIAL_TOKENS.values(), *words_of([*texts, prompt.user, prompt.assistant])]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    config = LlamaConfig(
        vocab_size=len(vocabulary), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
        num_attention_heads=heads, max_position_embeddings=max_length, tie_word_embeddings=True,
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
