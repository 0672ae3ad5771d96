"""Training data of the comprehension model: LLaVA conversation files (instruction tuning) and
caption shards (the projector's alignment stage), as batches of images, token ids and answer labels.

A batch: "image" (B, 3, S, S) in the VQ tokenizer's [-1, 1], "input_ids" (B, L) with one
IMAGE_PLACEHOLDER a row, "labels" (B, L) (IGNORE_INDEX off the answers), "attention_mask" (B, L).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from ..config import ConfigError
from ..data.datamodule import TokLIPDataModule
from ..data.samples import DEFAULT_MAX_IMAGE_PIXELS, SkippedSample, caption_of, image_bytes, open_image
from ..data.scene_questions import CAPTION_INSTRUCTION
from ..data.transforms import eval_transform, preprocess_config
from ..data.workers import SignalSafeLoader
from ..distributed import rank_and_world
from .conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Conversation,
    PromptFormat,
    caption_conversation,
    pad_batch,
    read_conversations,
)
from .language_model import load_tokenizer

log = logging.getLogger(__name__)


class CutTooShort(ValueError):
    """A conversation that `max_length` would cut before its image or before any of its answers."""


@dataclass
class ConversationEncoder:
    """A conversation -> {"input_ids", "labels"} (1-D int64), cut to `max_length` text tokens when given
    (the image counts as one: the model's context check sees the N it becomes). A cut that would leave
    no image or no answer to learn is a CutTooShort error, not a sample that trains nothing."""

    tokenizer: Any
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    max_length: int | None = None

    def __call__(self, conversation: Conversation) -> dict[str, torch.Tensor]:
        ids, labels = self.prompt_format.encode(self.tokenizer, conversation)
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if IMAGE_PLACEHOLDER not in ids or all(label == IGNORE_INDEX for label in labels):
                raise CutTooShort(f"max_length={self.max_length} cuts it before its image or its first answer")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def collate_conversations(samples: Sequence[dict[str, torch.Tensor] | None], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack images; pad ids (with `pad_token_id`), labels and the attention mask on the right.
    Samples that could not be read (None) are left out."""
    samples = [s for s in samples if s is not None]
    if not samples:
        raise ValueError("a batch in which no sample could be read (see the warnings naming them)")
    text = pad_batch([s["input_ids"].tolist() for s in samples], pad_token_id, [s["labels"].tolist() for s in samples])
    return {"image": torch.stack([s["image"] for s in samples]), **text}


@dataclass
class PadTo:
    """collate_conversations with a picklable pad id (loader workers)."""

    pad_token_id: int

    def __call__(self, samples: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        return collate_conversations(samples, self.pad_token_id)


class ConversationDataset(Dataset):
    """The records of a LLaVA conversation file, their images read from `image_folder`. An image that
    cannot be read is skipped (None, left out of its batch) with a warning naming it."""

    def __init__(
        self,
        conversations: Sequence[Conversation],
        image_folder: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        encoder: ConversationEncoder,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.conversations, self.image_folder = list(conversations), Path(image_folder)
        self.transform, self.encoder, self.max_image_pixels = transform, encoder, max_image_pixels

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        conversation = self.conversations[index]
        path = self.image_folder / conversation.image
        try:
            text = self.encoder(conversation)
            image = open_image(path.read_bytes(), self.max_image_pixels)
        except CutTooShort as err:
            log.warning("skipped conversation %s (%s): %s", index, conversation.id or "no id", err)
            return None
        except (OSError, SkippedSample) as err:
            log.warning("skipped conversation %s (%s): image %s: %s", index, conversation.id or "no id", path, err)
            return None
        return {"image": self.transform(image), **text}


def subset(items: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    """The first ceil(fraction x n) items of a seeded shuffle: nested for growing fractions of one seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.fraction={fraction}: expected a value in (0, 1]")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[: math.ceil(fraction * len(items))])]


class EpochShuffle(DistributedSampler):
    """This rank's share of a shuffle drawn from (seed, epoch), which a resumed run enters past the samples
    its checkpoint had used (`resume_at`). A DistributedSampler, so that Lightning keeps it under DDP and
    calls its `set_epoch`; each epoch's order is a function of the seed alone, so a resumed run can
    draw it again."""

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples of this rank used in it)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            indices = indices[self.resume_at[1] :]
            self.resume_at = None
        return iter(indices)


class ConversationDataModule(L.LightningDataModule):
    """Instruction tuning data: a LLaVA conversation file, its images under `image_folder`, tokenized
    by the LM's tokenizer (`tokenizer`: the LM's directory). `fraction` trains on a seeded subset of
    the records (the miniature's data-efficiency curve). Each epoch is a seeded shuffle; `state_dict`
    holds how far into it training got, so a run resumed mid-epoch neither replays nor skips a record."""

    def __init__(
        self,
        conversations: str | os.PathLike,
        image_folder: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike,
        image_size: int,
        fraction: float = 1.0,
        batch_size_per_device: int = 16,
        num_workers: int = 4,
        seed: int = 0,
        max_length: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        subset([], fraction, seed)  # a bad fraction fails here, before anything is read
        self.path, self.image_folder, self.tokenizer_path = Path(conversations), Path(image_folder), tokenizer
        self.image_size, self.fraction, self.seed = image_size, fraction, seed
        self.batch_size, self.num_workers = batch_size_per_device, num_workers
        self.max_length, self.max_image_pixels = max_length, max_image_pixels
        self.dataset: ConversationDataset | None = None
        self.sampler: EpochShuffle | None = None
        self._position = (0, 0)  # (epoch, batches this rank has trained on in it)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_path, source="data.tokenizer")
        records = subset(read_conversations(self.path), self.fraction, self.seed)
        world_size = rank_and_world()[1]
        if len(records) < self.batch_size * world_size:  # each rank's share would hold no whole batch
            raise ValueError(
                f"data.conversations={self.path}: {len(records)} record(s) (fraction {self.fraction}), fewer than a batch of "
                f"{self.batch_size} on each of {world_size} rank(s)"
            )
        transform = eval_transform(preprocess_config(self.image_size))  # LLaVA pads or resizes, no augmentation
        self.dataset = ConversationDataset(
            records, self.image_folder, transform, ConversationEncoder(tokenizer, max_length=self.max_length), self.max_image_pixels
        )
        self.pad_token_id = tokenizer.pad_token_id

    def train_dataloader(self) -> SignalSafeLoader:
        self.sampler = EpochShuffle(self.dataset, self.seed, *rank_and_world())
        self._resume_sampler()
        return SignalSafeLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True, num_workers=self.num_workers,
            collate_fn=PadTo(self.pad_token_id), persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    # ---- data position ----------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts the batches training takes (called once for each, as it is trained on)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self.sampler.epoch
        batches = self._position[1] if epoch == self._position[0] else 0
        self._position = (epoch, batches + 1)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the batches of it trained on, the same on every rank."""
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._position = (state_dict["epoch"], state_dict["batches"])
        self._resume_sampler()

    def _resume_sampler(self) -> None:
        if self.sampler is not None and self._position[1]:
            epoch, batches = self._position
            self.sampler.resume_at = (epoch, batches * self.batch_size)


@dataclass
class CaptionConversationDecoder:
    """A raw shard sample -> a caption conversation's tensors, padded to `length` (the stream stacks them)."""

    image_transform: Callable[[Image.Image], torch.Tensor]
    encoder: ConversationEncoder
    instruction: str
    length: int
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        data, caption = image_bytes(sample), caption_of(sample)
        encoded = self.encoder(caption_conversation("", caption, self.instruction))
        text = pad_batch(
            [encoded["input_ids"].tolist()], self.encoder.tokenizer.pad_token_id, [encoded["labels"].tolist()], length=self.length
        )
        return {"image": self.image_transform(open_image(data, self.max_image_pixels)), **{k: v[0] for k, v in text.items()}}


class CaptionShardDataModule(TokLIPDataModule):
    """The alignment stage's data: img2dataset caption shards streamed as TokLIP's training data is
    (same shuffles, skip counts, resume), each sample one turn, `instruction` -> its caption, cut and
    padded to `max_length` tokens. `tokenizer` is the LM's directory."""

    def __init__(
        self,
        train_urls: str | Sequence[str],
        *,
        tokenizer: str | os.PathLike,
        instruction: str = CAPTION_INSTRUCTION,
        max_length: int = 64,
        **options: Any,
    ) -> None:
        super().__init__(train_urls, text_tokenizer=None, **options)
        self.instruction, self.max_length = instruction, max_length
        self.language_tokenizer = load_tokenizer(tokenizer, source="data.tokenizer")

    # The stage validates nothing: Lightning's own (absent) hook, so that it looks for no validation loop.
    val_dataloader = L.LightningDataModule.val_dataloader

    def sample_decoder(self) -> CaptionConversationDecoder:
        encoder = ConversationEncoder(self.language_tokenizer, max_length=self.max_length)
        try:  # the prompt is the same for every caption: a cut into it is a setting to fix, once
            encoder(caption_conversation("", "caption", self.instruction))
        except CutTooShort:
            raise ConfigError(f"data.max_length={self.max_length} leaves no caption after the prompt ({self.instruction!r})") from None
        transform = eval_transform(self.eval_preprocess)
        return CaptionConversationDecoder(transform, encoder, self.instruction, self.max_length, self.max_image_pixels)
