"""The training stream: shards -> shuffled raw samples -> decoded, batched tensors, per rank and worker.

Order of stages (the reference's): shard shuffle (seed + epoch, the same on every rank) -> split by
rank, then by worker -> tar reading -> sample shuffle -> decode -> batch. With `resampled` each
worker instead draws shards with replacement (sources picked by weight) from its own seed.

Every batch carries a small `stream` tensor, [worker, position, batches, *counters]: the worker's
position in its raw (pre-decode) sample stream after that batch, the batches it has produced this
epoch, and its cumulative skip counters. The DataModule reads it in the main process to report skips
and to resume mid-epoch: a resumed worker skips its first `position` raw samples without decoding
them, which puts it exactly where it was. (With several workers, the loader's round-robin restarts
at worker 0, so the first batches after a resume may come in another order; with none it is exact.)
A worker whose shards run out sends a last item, `{"stream": ...}` alone: the skips after its last
full batch, and the proof that it delivered nothing when it never filled one.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle

from .samples import SKIP_REASONS, DataQualityError, SkippedSample, describe_counts
from .sources import ShardSource, tar_samples
from .transforms import seeded_augmentation

log = logging.getLogger(__name__)

COUNTERS = (*SKIP_REASONS, "bad_shard")  # the tail of a batch's `stream` tensor, in this order
STREAM_HEAD = 3  # worker, position, batches
REFERENCE_SHARD_SHUFFLE = (2000, 500)  # (buffer, initial fill), open_clip's values
REFERENCE_SAMPLE_SHUFFLE = (5000, 1000)


class SharedEpoch:
    """The epoch number, shared with (persistent) loader workers so each epoch reshuffles."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


@dataclass
class ResumePoint:
    """Where each worker of each rank stood: positions[rank][worker] = (raw samples, batches) consumed."""

    epoch: int
    positions: list[list[tuple[int, int]]] = field(default_factory=list)

    def offset(self, epoch: int, rank: int, worker: int, world_size: int, num_workers: int) -> tuple[int, int]:
        if epoch != self.epoch:
            return 0, 0
        if len(self.positions) != world_size or any(len(p) != num_workers for p in self.positions):
            shape = f"{len(self.positions)} ranks x {len(self.positions[0]) if self.positions else 0} workers"
            log.warning(
                "data position not restored: saved with %s, resumed with %d x %d; epoch %d restarts its stream",
                shape, world_size, num_workers, epoch,
            )  # fmt: skip
            return 0, 0
        position, batches = self.positions[rank][worker]
        return position, batches


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream(IterableDataset):
    """One rank's stream of training batches; `len()` is its number of batches in an epoch."""

    def __init__(
        self,
        sources: Sequence[ShardSource],
        decoder: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        *,
        batch_size: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        seed: int = 0,
        shard_shuffle: Sequence[int] = REFERENCE_SHARD_SHUFFLE,
        sample_shuffle: Sequence[int] = REFERENCE_SAMPLE_SHUFFLE,
        epoch: SharedEpoch | None = None,
        resume: ResumePoint | None = None,
    ) -> None:
        super().__init__()
        if not resampled and any(s.weight != sources[0].weight for s in sources):
            raise ValueError("source weights need resampled=True: without resampling every sample is seen once")
        self.sources = list(sources)
        self.decoder = decoder
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.rank, self.world_size = rank, world_size
        self.resampled = resampled
        self.seed = seed
        self.shard_shuffle = tuple(shard_shuffle)
        self.sample_shuffle = tuple(sample_shuffle)
        self.epoch = epoch or SharedEpoch()
        self.resume = resume

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_shards(self) -> int:
        return sum(len(s.urls) for s in self.sources)

    def check_split(self, num_workers: int) -> None:
        """Without resampling, every rank x worker needs at least one shard of its own."""
        streams = self.world_size * max(num_workers, 1)
        if not self.resampled and self.num_shards < streams:
            raise ValueError(
                f"{self.num_shards} shards for {self.world_size} ranks x {max(num_workers, 1)} workers: each stream needs "
                "at least one shard without resampling; use fewer workers, more shards, or resampled=True"
            )

    def _stream_seed(self, kind: str, epoch: int, worker: int) -> str:
        return f"{kind}/{self.seed}/{epoch}/{self.rank}/{worker}"

    def _shard_urls(self, epoch: int, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(self._stream_seed("shards", epoch, worker))
            weights = [s.weight for s in self.sources]
            while True:
                yield rng.choice(rng.choices(self.sources, weights)[0].urls)
        self.check_split(num_workers)
        urls = [url for source in self.sources for url in source.urls]
        if self.shard_shuffle[0] > 1:
            # Seeded by seed + epoch only: every rank computes the same order, then takes its part.
            rng = random.Random(self.seed + epoch)
            urls = list(shuffle(*self.shard_shuffle, rng=rng)(iter(urls)))
        yield from urls[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = _worker()
        epoch = self.epoch.get()
        counts: Counter[str] = Counter()
        current = {"url": None, "opened": 0, "decoded": 0}
        bad_urls: set[str] = set()
        # Resampling never runs out of shards: data of which nothing decodes would be drawn forever, no batch, no error.
        fruitless_draws = 10 * self.num_shards + self.sample_shuffle[0]

        def opened() -> Iterator[dict[str, str]]:
            for url in self._shard_urls(epoch, worker, num_workers):
                if self.resampled and current["opened"] >= fruitless_draws and not current["decoded"]:
                    found = describe_counts(counts) or "no samples at all"
                    raise DataQualityError(f"{current['opened']} shards drawn and not one sample decoded ({found}); check the shards")
                current["url"], current["opened"] = url, current["opened"] + 1
                yield {"url": url}

        def on_shard_error(err: Exception) -> bool:
            # A truncated or unreadable shard ends there; the stream goes on with the next one.
            if current["url"] not in bad_urls:
                bad_urls.add(current["url"])
                counts["bad_shard"] += 1
                log.warning("shard %s is damaged (%s): what of it cannot be read is skipped", current["url"], err)
            return True

        samples = tar_samples(opened(), handler=on_shard_error)
        if self.sample_shuffle[0] > 1:
            rng = random.Random(self._stream_seed("samples", epoch, worker))
            samples = shuffle(*self.sample_shuffle, rng=rng)(samples)

        augment_seed = random.Random(self._stream_seed("augment", epoch, worker)).getrandbits(62)
        skip, produced = self.resume.offset(epoch, self.rank, worker, self.world_size, num_workers) if self.resume else (0, 0)
        quota = math.ceil(self.num_batches / num_workers)
        position, batch = 0, []
        for sample in samples if produced < quota else ():  # a resumed worker may have finished its quota
            position += 1
            if position <= skip:
                continue  # resuming: consumed before the checkpoint; not decoded again
            try:
                # Augmentation drawn from (stream, position) alone: a resumed run crops as the first did.
                with seeded_augmentation(augment_seed + position):
                    batch.append(self.decoder(sample))
                current["decoded"] += 1
            except SkippedSample as skipped:
                counts[skipped.reason] += 1
                log.debug("skipped %s from %s: %s", sample.get("__key__"), sample.get("__url__"), skipped)
                continue
            if len(batch) == self.batch_size:
                produced += 1
                yield self._collate(batch, (worker, position, produced), counts)
                batch = []
                if produced >= quota:
                    break
        # A partial last batch is dropped, as in the reference. The closing report carries what was
        # skipped since the last batch, and how many batches this worker produced this epoch.
        yield {"stream": self._stream_tensor((worker, max(position, skip), produced), counts)}

    @staticmethod
    def _collate(batch: list[dict[str, torch.Tensor]], head: tuple[int, int, int], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        stacked = {name: torch.stack([sample[name] for sample in batch]) for name in batch[0]}
        return {**stacked, "stream": ShardStream._stream_tensor(head, counts)}

    @staticmethod
    def _stream_tensor(head: tuple[int, int, int], counts: Mapping[str, int]) -> torch.Tensor:
        return torch.tensor([*head, *(counts[c] for c in COUNTERS)], dtype=torch.int64)
