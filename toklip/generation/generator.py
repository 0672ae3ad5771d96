"""A LlamaGen-style autoregressive generator over VQ indices, on Hugging Face's Llama (`inputs_embeds`,
its KV cache, rotary positions).

The sequence is `prefix_tokens` condition tokens (a class embedding, or the frozen text tower's prompt
embedding projected), then one input per image token; the output at the last prefix position predicts
the first index, the output after index i predicts index i + 1. Two input modes:
- `codes`: a learned embedding of the VQ index (the LlamaGen baseline);
- `codes+toklip`: that embedding concatenated with the frozen TokLIP model's causal feature of the
  token (which depends on tokens 0..i only: the token encoder is causal), projected to the width. The
  paper's generation input.
A null condition (the last class, or a learned null prompt) serves condition dropout and
classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, LlamaConfig, LlamaModel
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..models.token_encoder import CausalCache
from ..models.toklip import TokLIP

INPUT_MODES = ("codes", "codes+toklip")


@dataclass(frozen=True)
class GeneratorSpec:
    """A generator's width, depth, heads and feed-forward width (LlamaGen's GPT sizes)."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int


def _llamagen_mlp(width: int) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4 x width, rounded up to a multiple of 256."""
    return -(-int(2 * 4 * width / 3) // 256) * 256


GENERATOR_SPECS = {
    "tiny": GeneratorSpec(128, 4, 4, 384),
    "B": GeneratorSpec(768, 12, 12, _llamagen_mlp(768)),
    "L": GeneratorSpec(1024, 24, 16, _llamagen_mlp(1024)),
    "XL": GeneratorSpec(1280, 36, 20, _llamagen_mlp(1280)),
}


def generator_spec(spec: GeneratorSpec | str | Mapping[str, int]) -> GeneratorSpec:
    """A spec from itself, its name in GENERATOR_SPECS, or its fields."""
    if isinstance(spec, GeneratorSpec):
        return spec
    if isinstance(spec, str):
        if spec not in GENERATOR_SPECS:
            raise ValueError(f"generator {spec!r}: choose from {', '.join(GENERATOR_SPECS)}, or give width, depth, heads, mlp_hidden")
        return GENERATOR_SPECS[spec]
    return GeneratorSpec(**spec)


class TokenGenerator(nn.Module):
    """Next-VQ-index prediction, class- or text-conditional, over `num_tokens` image tokens."""

    def __init__(
        self,
        spec: GeneratorSpec | str | Mapping[str, int],
        *,
        codebook_size: int,
        num_tokens: int,
        input_mode: str = "codes",
        toklip_width: int | None = None,
        num_classes: int | None = None,
        text_width: int | None = None,
        prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        spec = generator_spec(spec)
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode={input_mode!r}: choose {' or '.join(INPUT_MODES)}")
        if input_mode == "codes+toklip" and not toklip_width:
            raise ValueError("input_mode='codes+toklip' needs toklip_width, the TokLIP feature width")
        if (num_classes is None) == (text_width is None):
            raise ValueError("give num_classes (class-conditional) or text_width (text-conditional), one of them")
        self.spec, self.codebook_size, self.num_tokens, self.input_mode = spec, codebook_size, num_tokens, input_mode
        self.prefix_tokens = 1 if num_classes is not None else prefix_tokens
        self.num_classes, self.toklip_width, self.text_width = num_classes, toklip_width, text_width
        width = spec.width
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, width)  # the last one: no condition
        else:
            self.text_projection = nn.Linear(text_width, width * self.prefix_tokens)
            self.null_text = nn.Parameter(torch.zeros(text_width))
        self.code_embedding = nn.Embedding(codebook_size, width)
        self.toklip_projection = nn.Linear(width + toklip_width, width) if input_mode == "codes+toklip" else None
        config = LlamaConfig(
            vocab_size=1,  # inputs arrive as embeddings; the head below predicts VQ indices
            hidden_size=width,
            intermediate_size=spec.mlp_hidden,
            num_hidden_layers=spec.depth,
            num_attention_heads=spec.heads,
            max_position_embeddings=self.prefix_tokens + num_tokens,
            bos_token_id=None,  # no text vocabulary: no special tokens
            eos_token_id=None,
            pad_token_id=None,
        )
        self.backbone = LlamaModel(config)
        self.backbone.embed_tokens = None  # never used: every input is an embedding
        self.head = nn.Linear(width, codebook_size, bias=False)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments: `TokenGenerator(**config)` builds this architecture again."""
        return {
            "spec": asdict(self.spec), "codebook_size": self.codebook_size, "num_tokens": self.num_tokens,
            "input_mode": self.input_mode, "toklip_width": self.toklip_width, "num_classes": self.num_classes,
            "text_width": self.text_width, "prefix_tokens": self.prefix_tokens,
        }  # fmt: skip

    @property
    def condition_kind(self) -> str:
        """`class` or `text`."""
        return "class" if self.num_classes is not None else "text"

    # ---- inputs -----------------------------------------------------------------------------------

    def condition_tokens(self, condition: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) (num_classes: none) or prompt embeddings (B, text_width) (NaN rows: none) ->
        the prefix (B, prefix_tokens, width)."""
        if self.num_classes is not None:
            return self.class_embedding(condition)[:, None]
        prompts = torch.where(condition.isnan().any(-1, keepdim=True), self.null_text.to(condition.dtype), condition)
        return self.text_projection(prompts).view(len(condition), self.prefix_tokens, -1)

    def null_condition(self, batch: int, device: torch.device) -> torch.Tensor:
        """The condition that means none (classifier-free guidance's unconditional branch)."""
        if self.num_classes is not None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return torch.full((batch, self.null_text.shape[0]), float("nan"), device=device)

    def drop_condition(self, condition: torch.Tensor, probability: float) -> torch.Tensor:
        """Replace each row's condition by none with `probability` (training for guidance)."""
        dropped = torch.rand(len(condition), device=condition.device) < probability
        null = self.null_condition(len(condition), condition.device)
        return torch.where(dropped.view(-1, *([1] * (condition.ndim - 1))), null, condition)

    def token_inputs(self, indices: torch.Tensor, toklip_features: torch.Tensor | None) -> torch.Tensor:
        """Indices (B, n) and, in `codes+toklip`, their TokLIP features (B, n, D) -> inputs (B, n, width)."""
        embedded = self.code_embedding(indices)
        if self.toklip_projection is None:
            return embedded
        if toklip_features is None:
            raise ValueError("input_mode='codes+toklip' needs the TokLIP features of the indices")
        return self.toklip_projection(torch.cat([embedded, toklip_features.to(embedded.dtype)], dim=-1))

    # ---- training: teacher forcing ------------------------------------------------------------------

    def forward(self, indices: torch.Tensor, condition: torch.Tensor, toklip_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, N, codebook_size) of every index of `indices` (B, N) given the ones before it."""
        inputs = torch.cat([self.condition_tokens(condition), self.token_inputs(indices[:, :-1], _all_but_last(toklip_features))], dim=1)
        hidden = self.backbone(inputs_embeds=inputs).last_hidden_state
        return self.head(hidden[:, self.prefix_tokens - 1 :])

    def loss(self, indices: torch.Tensor, condition: torch.Tensor, toklip_features: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the next index."""
        logits = self(indices, condition, toklip_features)
        return F.cross_entropy(logits.flatten(0, 1).float(), indices.flatten())

    # ---- sampling -------------------------------------------------------------------------------------

    def stream(self, condition: torch.Tensor, toklip: TokLIP | None = None) -> IncrementalStream:
        """The incremental form of `forward`: the logits of the next index, a token at a time."""
        return IncrementalStream(self, condition, toklip)

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        *,
        toklip: TokLIP | None = None,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample indices (B, N) a token at a time (see `IncrementalStream`). `guidance_scale` runs the
        unconditional branch beside the conditional one and samples from unconditional + scale x
        (conditional - unconditional), classifier-free guidance (1: the conditional model; None: no
        unconditional branch). Top-k, top-p and temperature are transformers' logits warpers."""
        batch = len(condition)
        guided = guidance_scale is not None
        if guided:
            condition = torch.cat([condition, self.null_condition(batch, condition.device)])
        warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + ([TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1.0 else [])
        )
        stream, sampled = self.stream(condition, toklip), []
        for position in range(self.num_tokens):
            logits = stream.logits
            if guided:
                conditional, unconditional = logits.chunk(2)
                logits = unconditional + guidance_scale * (conditional - unconditional)
            index = torch.multinomial(warpers(None, logits).softmax(-1), 1, generator=generator)  # (B, 1)
            sampled.append(index)
            if position < self.num_tokens - 1:
                stream.advance(torch.cat([index, index]) if guided else index)
        return torch.cat(sampled, dim=1)


class IncrementalStream:
    """A generator's pass over a sequence, one token at a time: the KV cache of its Llama and, in
    `codes+toklip`, TokLIP's incremental causal pass (`TokLIP.extend_indices`), so that each new token
    costs one token's work in both. `logits` (B, codebook_size) predict the next index; `advance(index)`
    appends one. Its logits equal `TokenGenerator.forward`'s (teacher forcing) on the same indices."""

    def __init__(self, model: TokenGenerator, condition: torch.Tensor, toklip: TokLIP | None) -> None:
        if model.toklip_projection is not None and toklip is None:
            raise ValueError("input_mode='codes+toklip' needs the TokLIP model that gives its features")
        self.model, self.toklip, self.toklip_cache = model, toklip, CausalCache()
        self._run(model.condition_tokens(condition), past=None)

    @torch.no_grad()
    def advance(self, index: torch.Tensor) -> None:
        """Append the indices (B, 1) of the next token."""
        features = self.toklip.extend_indices(index, self.toklip_cache) if self.model.toklip_projection is not None else None
        self._run(self.model.token_inputs(index, features), past=self.past)

    @torch.no_grad()
    def _run(self, inputs: torch.Tensor, past: Cache | None) -> None:
        out = self.model.backbone(inputs_embeds=inputs, cache=past, use_cache=True)
        self.past = out.cache
        self.logits = self.model.head(out.last_hidden_state[:, -1]).float()


def _all_but_last(features: torch.Tensor | None) -> torch.Tensor | None:
    """The features of every token but the last (the inputs of teacher forcing)."""
    return None if features is None else features[:, :-1]
