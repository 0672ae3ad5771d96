"""An LLaVA-style model: visual features -> a 2-layer MLP projector -> the language model's embedding
space, spliced into the prompt where its image placeholder stands; answers come from the LM's own `generate`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation, PromptFormat, pad_batch
from .vision import VisualInput


class Projector(nn.Sequential):
    """Visual features (C) -> the LM's embedding width (H): `mlp2x_gelu` (LLaVA-1.5's: Linear(C, H),
    GELU, Linear(H, H)) or `linear` (LLaVA-1's)."""

    KINDS = ("mlp2x_gelu", "linear")

    def __init__(self, in_features: int, out_features: int, kind: str = "mlp2x_gelu") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"projector.kind={kind!r}: choose {' or '.join(self.KINDS)}")
        if kind == "linear":
            super().__init__(nn.Linear(in_features, out_features))
        else:
            super().__init__(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def splice_image_tokens(
    text_embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Put each sample's N image embeddings where its one IMAGE_PLACEHOLDER id stands.

    text_embeddings (B, L, H) (anything at the placeholder), input_ids and attention_mask (B, L) with
    padding on either side, image_embeddings (B, N, H), labels (B, L) or None. Returns embeddings
    (B, L', H), attention mask (B, L') and labels (B, L') (IGNORE_INDEX on the image tokens and the
    padding), padded on `padding_side` (left for generation).
    """
    rows, row_labels = [], []
    for b in range(len(input_ids)):
        real = attention_mask[b].bool()
        ids, embedded = input_ids[b][real], text_embeddings[b][real]
        at = (ids == IMAGE_PLACEHOLDER).nonzero().flatten()
        if len(at) != 1:
            raise ValueError(f"sample {b} has {len(at)} image placeholders; each needs exactly one")
        p = int(at[0])
        rows.append(torch.cat([embedded[:p], image_embeddings[b].to(embedded.dtype), embedded[p + 1 :]]))
        if labels is not None:
            kept = labels[b][real]
            row_labels.append(torch.cat([kept[:p], kept.new_full((image_embeddings.shape[1],), IGNORE_INDEX), kept[p + 1 :]]))
    longest = max(len(row) for row in rows)
    embeddings = text_embeddings.new_zeros(len(rows), longest, text_embeddings.shape[-1])
    mask = attention_mask.new_zeros(len(rows), longest)
    spliced_labels = None if labels is None else labels.new_full((len(rows), longest), IGNORE_INDEX)
    for b, row in enumerate(rows):
        span = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
        embeddings[b, span], mask[b, span] = row, 1
        if spliced_labels is not None:
            spliced_labels[b, span] = row_labels[b]
    return embeddings, mask, spliced_labels


class VisualLanguageModel(nn.Module):
    """A visual input, its projector, and a causal LM with its tokenizer."""

    def __init__(
        self,
        vision: VisualInput,
        language_model: nn.Module,
        tokenizer: Any,
        projector: str = "mlp2x_gelu",
        prompt_format: PromptFormat | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.projector = Projector(vision.width, language_model.config.hidden_size, projector)
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the image's tokens in the LM's embedding space (B, N, hidden)."""
        return self.projector(self.vision(images))

    def embed(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The LM's input embeddings, attention mask and labels, image tokens spliced in; a sample longer
        than the LM's context is an error (some LMs would read past it unchecked, others fail on an index)."""
        text = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))  # the placeholder is replaced
        image = self.image_embeddings(images)
        spliced = splice_image_tokens(text, input_ids, attention_mask, image, labels, padding_side)
        context = getattr(self.language_model.config, "max_position_embeddings", None)
        lengths = spliced[1].sum(1)
        if context is not None and int(lengths.max()) > context:
            b = int(lengths.argmax())
            raise ValueError(
                f"sample {b}: its {image.shape[1]} image and {int(attention_mask[b].sum()) - 1} text tokens make {int(lengths[b])}, "
                f"more than the language model's context of {context} (max_position_embeddings): shorten it (in training, data.max_length cuts conversations)"
            )
        return spliced

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss over the answer tokens (labels other than IGNORE_INDEX)."""
        embeddings, mask, labels = self.embed(images, input_ids, attention_mask, labels)
        return self.language_model(inputs_embeds=embeddings, attention_mask=mask, labels=labels, use_cache=False).loss

    def answer_log_likelihoods(self, images: torch.Tensor, conversations: Sequence[Conversation]) -> torch.Tensor:
        """The summed log-likelihood of each conversation's answer tokens (B,): multiple choice scores."""
        encoded = [self.prompt_format.encode(self.tokenizer, c) for c in conversations]
        batch = pad_batch([ids for ids, _ in encoded], self.tokenizer.pad_token_id, [labels for _, labels in encoded])
        batch = {k: v.to(images.device) for k, v in batch.items()}
        embeddings, mask, labels = self.embed(images, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logits = self.language_model(inputs_embeds=embeddings, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        picked = -F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        return (picked * targets.ne(IGNORE_INDEX)).sum(1)

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one a (image, question) pair, by the LM's `generate`."""
        prompts = [self.prompt_format.prompt(self.tokenizer, q) for q in questions]
        batch = pad_batch(prompts, self.tokenizer.pad_token_id, side="left")
        embeddings, mask, _ = self.embed(
            images, batch["input_ids"].to(images.device), batch["attention_mask"].to(images.device), padding_side="left"
        )
        generated = self.language_model.generate(
            inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
