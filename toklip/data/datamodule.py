"""TokLIPDataModule: WebDataset training shards and the evaluation sets, for a Lightning Trainer."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..distributed import rank_and_world
from .eval_sets import EvalSet, build_eval_sets
from .samples import DEFAULT_MAX_IMAGE_PIXELS, SKIP_REASONS, DataQualityError, SampleDecoder, describe_counts
from .sources import resolve_sources
from .stream import COUNTERS, REFERENCE_SAMPLE_SHUFFLE, REFERENCE_SHARD_SHUFFLE, STREAM_HEAD, ResumePoint, ShardStream, SharedEpoch
from .transforms import TRAIN_CROP_SCALE, eval_transform, preprocess_config, train_transform
from .workers import SignalSafeLoader

log = logging.getLogger(__name__)


class _EpochLoader(SignalSafeLoader):
    """Tells the stream's workers which epoch starts, each time the Trainer starts iterating; hands the
    workers' closing reports (`{"stream": ...}` alone) to `on_report` instead of the training loop, and
    calls `on_exhausted(batches)` when every worker's stream has ended."""

    def __init__(
        self,
        stream: ShardStream,
        epoch_of_trainer: Callable[[], int],
        on_report: Callable[[torch.Tensor], None],
        on_exhausted: Callable[[int], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self._epoch_of_trainer = epoch_of_trainer
        self._on_report = on_report
        self._on_exhausted = on_exhausted

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.epoch.set(self._epoch_of_trainer())
        batches = 0
        for item in super().__iter__():
            if item.keys() == {"stream"}:
                self._on_report(item["stream"])
                batches += int(item["stream"][2])  # the batches that worker produced this epoch
                continue
            yield item
        self._on_exhausted(batches)


class TokLIPDataModule(L.LightningDataModule):
    """Streams img2dataset WebDataset shards for training and loads the evaluation sets.

    An epoch is `train_num_samples` samples over all ranks: ceil(samples / global batch) steps,
    rounded up to a multiple of the workers (open_clip's definition). Without `resampled`, shards
    are split between ranks and then workers, so each sample is seen at most once an epoch; with
    it, every worker draws shards with replacement from its own seed.

    `text_tokenizer` is the model's (`toklip.get_text_tokenizer(preset)`); captions are tokenized
    in the workers. `mean`/`std` default to the VQ tokenizer's [-1, 1] input.
    `eval_sets` maps a name to a spec: {"kind": "zeroshot", "root": ...} or
    {"kind": "retrieval", "captions": ..., "images": ...}; see `toklip.data.eval_sets`.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str] | None = None,
        *,
        text_tokenizer,
        image_size: int,
        train_num_samples: int | None = None,
        train_weights: Sequence[float] | None = None,
        resampled: bool = False,
        batch_size_per_device: int = 16,
        num_workers: int = 4,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_scale: Sequence[float] = TRAIN_CROP_SCALE,
        shard_shuffle: Sequence[int] = REFERENCE_SHARD_SHUFFLE,
        sample_shuffle: Sequence[int] = REFERENCE_SAMPLE_SHUFFLE,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_skip_fraction: float = 0.1,
        min_samples_for_skip_check: int = 1000,
        eval_sets: Mapping[str, Mapping[str, Any]] | None = None,
        eval_batch_size: int | None = None,
        eval_resize_mode: str = "shortest",
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
    ) -> None:
        super().__init__()
        self.check_arguments(
            image_size=image_size, train_num_samples=train_num_samples, batch_size_per_device=batch_size_per_device,
            num_workers=num_workers, max_skip_fraction=max_skip_fraction,
        )  # fmt: skip
        self.train_urls = train_urls
        self.text_tokenizer = text_tokenizer
        self.train_num_samples = train_num_samples
        self.train_weights = None if train_weights is None else list(train_weights)
        self.resampled = resampled
        self.batch_size = batch_size_per_device
        self.num_workers = num_workers
        self.seed = seed
        norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        self.preprocess = preprocess_config(image_size, **norm)
        self.eval_preprocess = preprocess_config(image_size, **norm, resize_mode=eval_resize_mode)
        self.crop_scale = tuple(crop_scale)
        self.shard_shuffle = tuple(shard_shuffle)
        self.sample_shuffle = tuple(sample_shuffle)
        self.max_image_pixels = max_image_pixels
        self.max_skip_fraction = max_skip_fraction
        self.min_samples_for_skip_check = min_samples_for_skip_check
        self.eval_set_specs = dict(eval_sets or {})
        self.eval_batch_size = eval_batch_size or batch_size_per_device
        self.loader_options = {
            "pin_memory": pin_memory and torch.cuda.is_available(),
            "persistent_workers": persistent_workers and num_workers > 0,
            "prefetch_factor": prefetch_factor if num_workers > 0 else None,
        }
        self.eval_sets: dict[str, EvalSet] = {}
        self._epoch = SharedEpoch()
        self._resume: ResumePoint | None = None
        self._positions: dict[int, tuple[int, int]] = {}  # worker -> (raw samples, batches) this epoch, this rank
        self._worker_counts: dict[int, torch.Tensor] = {}  # worker -> its cumulative counters this epoch
        self._past_counts = torch.zeros(len(COUNTERS), dtype=torch.int64)  # earlier epochs and runs
        self._seen_epoch: int | None = None

    # Bounds of the numeric arguments: (lowest, highest), None for no bound.
    _BOUNDS: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "image_size": (1, None),
        "train_num_samples": (1, None),
        "batch_size_per_device": (1, None),
        "num_workers": (0, None),
        "max_skip_fraction": (0, 1),
    }

    @classmethod
    def check_arguments(cls, **arguments: Any) -> None:
        """Out-of-range values, named as their config keys (toklip.preflight calls this before any data is made)."""
        for name, (low, high) in cls._BOUNDS.items():
            value = arguments.get(name)
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(f"data.{name}={value!r}: expected a value {wanted}")

    # ---- set-up -------------------------------------------------------------------------------

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self._epoch.get()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate", "test") and not self.eval_sets:
            transform = eval_transform(self.eval_preprocess)
            self.eval_sets = build_eval_sets(self.eval_set_specs, transform)
        if stage in (None, "fit"):
            self.train_stream(*rank_and_world()).check_split(self.num_workers)

    def num_batches_per_epoch(self, world_size: int) -> int:
        """Steps an epoch on each rank: ceil(samples / global batch), a multiple of the workers."""
        if not self.train_num_samples:
            raise ValueError("data.train_num_samples is required: the number of samples that make an epoch")
        global_batch = self.batch_size * world_size
        workers = max(self.num_workers, 1)
        return math.ceil(math.ceil(self.train_num_samples / global_batch) / workers) * workers

    def sample_decoder(self) -> Callable[[dict[str, Any]], dict[str, torch.Tensor]]:
        """A raw training sample -> the tensors of a batch (here: the augmented image and caption tokens)."""
        return SampleDecoder(train_transform(self.preprocess, self.crop_scale), self.text_tokenizer, self.max_image_pixels)

    def train_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The training stream of one rank (what its loader's workers iterate)."""
        if not self.train_urls:
            raise ValueError("data.train_urls is required for training: a shard pattern such as /data/cc12m/{00000..01242}.tar")
        return ShardStream(
            resolve_sources(self.train_urls, self.train_weights),
            self.sample_decoder(),
            batch_size=self.batch_size,
            num_batches=self.num_batches_per_epoch(world_size),
            rank=rank,
            world_size=world_size,
            resampled=self.resampled,
            seed=self.seed,
            shard_shuffle=self.shard_shuffle,
            sample_shuffle=self.sample_shuffle,
            epoch=self._epoch,
            resume=self._resume,
        )

    # ---- loaders ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(*rank_and_world())

    def train_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The training loader of one rank, outside a Trainer (benchmarks, tests, your own loop)."""
        return _EpochLoader(
            self.train_stream(rank, world_size),
            self._current_epoch,
            on_report=self._record,
            on_exhausted=self._check_delivered,
            num_workers=self.num_workers,
            **self.loader_options,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            SignalSafeLoader(dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers, shuffle=False, **self.loader_options)
            for dataset in self.eval_sets.values()
        ]

    # ---- skip accounting and data position ------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "stream" in batch:
            batch = dict(batch)
            self._record(batch.pop("stream"))
        return batch

    def _record(self, stream: torch.Tensor) -> None:
        epoch = self._current_epoch()
        if epoch != self._seen_epoch:  # a new epoch: fold the last one's counters into the past
            self._past_counts += self._epoch_counts()
            self._positions, self._worker_counts, self._seen_epoch = {}, {}, epoch
        worker, position, batches = stream[:STREAM_HEAD].tolist()
        self._positions[worker] = (position, batches)
        self._worker_counts[worker] = stream[STREAM_HEAD:].clone()
        self._check_skip_fraction()

    def _epoch_counts(self) -> torch.Tensor:
        """This epoch's counters on this rank, summed over its workers (COUNTERS order)."""
        return sum(self._worker_counts.values(), torch.zeros_like(self._past_counts))

    def skip_counts(self) -> dict[str, int]:
        """Cumulative counts on this rank: skipped samples by reason, and bad shards."""
        return dict(zip(COUNTERS, (self._past_counts + self._epoch_counts()).tolist()))

    def data_metrics(self) -> dict[str, float]:
        """`data/skipped_<reason>` and `data/bad_shards`, for a LightningModule to log."""
        counts = self.skip_counts()
        metrics = {f"data/skipped_{reason}": float(counts[reason]) for reason in SKIP_REASONS}
        metrics["data/bad_shards"] = float(counts["bad_shard"])
        return metrics

    def _check_delivered(self, batches: int) -> None:
        """An epoch whose streams all ended without one batch: nothing was learnt, and the run must not pass.
        Nor may one that bad shards cut short by more than `max_skip_fraction` of its batches (a shard
        counts once, whatever it held). An epoch short for want of samples alone (train_num_samples set
        above the data's) goes on, as open_clip's does."""
        counts = dict(zip(COUNTERS, self._epoch_counts().tolist()))
        found = describe_counts(counts) or "no samples at all"
        if batches == 0:
            raise DataQualityError(
                f"epoch {self._current_epoch()} delivered no training batch of {self.batch_size} samples ({found}); "
                f"check the shards in {self.train_urls!r}"
            )
        planned = self.num_batches_per_epoch(rank_and_world()[1])
        delivered = sum(produced for _, produced in self._positions.values())  # a resumed epoch's earlier batches too
        if counts["bad_shard"] and delivered < (1 - self.max_skip_fraction) * planned:
            raise DataQualityError(
                f"epoch {self._current_epoch()} delivered {delivered} of its {planned} batches ({found}; "
                f"max_skip_fraction={self.max_skip_fraction}); check the shards in {self.train_urls!r}"
            )

    def _check_skip_fraction(self) -> None:
        this_epoch = dict(zip(COUNTERS, self._epoch_counts().tolist()))
        skipped = sum(this_epoch[r] for r in SKIP_REASONS)
        seen = sum(position for position, _ in self._positions.values())  # raw samples read, skips included
        if seen >= self.min_samples_for_skip_check and skipped / max(seen, 1) > self.max_skip_fraction:
            reasons = describe_counts({r: this_epoch[r] for r in SKIP_REASONS})
            raise DataQualityError(
                f"{skipped} of {seen} samples skipped ({skipped / seen:.1%} > max_skip_fraction={self.max_skip_fraction}): "
                f"{reasons}; check the shards in {self.train_urls!r}"
            )

    def state_dict(self) -> dict[str, Any]:
        """This epoch's data position on every rank (gathered), and the skip counters."""
        _, world_size = rank_and_world()
        workers = max(self.num_workers, 1)
        positions = torch.tensor([self._positions.get(w, (0, 0)) for w in range(workers)], dtype=torch.int64)
        if world_size > 1:
            gathered = [torch.zeros_like(positions) for _ in range(world_size)]
            torch.distributed.all_gather_object(gathered, positions)
            positions_by_rank = [p.tolist() for p in gathered]
        else:
            positions_by_rank = [positions.tolist()]
        return {"epoch": self._seen_epoch or 0, "positions": positions_by_rank, "skip_counts": self.skip_counts()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = ResumePoint(state_dict["epoch"], [[tuple(w) for w in rank] for rank in state_dict["positions"]])
        counts = state_dict.get("skip_counts", {})
        self._past_counts = torch.tensor([counts.get(c, 0) for c in COUNTERS], dtype=torch.int64)
