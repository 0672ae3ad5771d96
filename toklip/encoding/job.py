"""The encode job: parts -> Lightning `predict` (any launcher, any number of ranks) -> one output file a part.

Each rank takes every world-size-th part, each of its loader workers every num_workers-th of those,
and a worker decodes and batches one part at a time, so no batch straddles two parts. The writer
(a prediction-writer callback, in the rank's main process) streams each part's records into a
temporary file and publishes it under its name once the part is whole; a part's record
(`<name>.json`: its input, counts and skips) goes down first. A re-run skips every part whose output
exists and redoes the rest: a killed job loses at most the parts it was writing. The output
directory's `manifest.json` records the job's settings (a re-run with others is refused) and, once a
job ends, the records of every finished part.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..checkpoints import is_temporary, publish, remove_stale_temporaries, replace_file, save_safetensors, temporary_path
from ..config import ConfigError
from ..data.cache import MANIFEST
from ..data.samples import DataQualityError, SkippedSample, describe_counts
from ..data.workers import SignalSafeLoader
from ..distributed import rank_and_world
from .parts import InputPart

log = logging.getLogger(__name__)

FORMATS = {"webdataset": ".tar", "safetensors": ".safetensors"}
Prepare = Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # a raw sample -> the encoder's inputs (raises SkippedSample)


def output_path(out: Path, part: str, format: str) -> Path:
    """The output file of the part named `part`."""
    return out / f"{part}{FORMATS[format]}"


def record_path(out: Path, part: str) -> Path:
    """The record (input, counts, skips) of the part named `part`."""
    return out / f"{part}.json"


def finished_record(out: Path, part: InputPart, format: str) -> dict[str, Any] | None:
    """The record of a finished part, or None. A part is finished when its output exists (it is renamed
    into place only when whole, after its record) and its record names the same input (a folder's
    files may have moved between parts)."""
    if not output_path(out, part.name, format).is_file():
        return None
    try:
        record = json.loads(record_path(out, part.name).read_text())
    except (OSError, ValueError):
        return None
    return record if all(record.get(key) == value for key, value in part.identity().items()) else None


# ---- reading ----------------------------------------------------------------------------------------


class PartBatches(IterableDataset):
    """Batches of prepared samples of `parts` (this rank's unfinished ones), split over the loader's workers.

    Each batch: {"part", "keys", "inputs" (stacked tensors, or None for an empty last batch), "last"} and,
    on a part's last batch, "skipped": counts by reason (a damaged shard counts as `bad_shard`, its
    samples before the damage kept). Each skipped image is named in a warning.
    """

    def __init__(self, parts: Sequence[InputPart], prepare: Prepare, batch_size: int) -> None:
        super().__init__()
        self.parts, self.prepare, self.batch_size = list(parts), prepare, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.parts[worker::workers]:
            yield from self._batches(part)

    def _batches(self, part: InputPart) -> Iterator[dict[str, Any]]:
        skipped: Counter[str] = Counter()
        keys, inputs = [], []
        samples = part.samples()
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as err:  # a truncated or unreadable shard: what was read is kept
                skipped["bad_shard"] += 1
                log.warning("input %s is truncated or unreadable after %d samples; the rest is skipped (%s)", part.source, len(keys), err)
                break
            try:
                inputs.append(self.prepare(sample))
            except SkippedSample as skip:
                skipped[skip.reason] += 1
                log.warning("skipped %s of %s: %s", sample.get("__key__"), part.source, skip)
                continue
            keys.append(sample["__key__"])
            if len(keys) == self.batch_size:
                yield self._batch(part, keys, inputs, last=False)
                keys, inputs = [], []
        yield {**self._batch(part, keys, inputs, last=True), "skipped": dict(skipped)}

    @staticmethod
    def _batch(part: InputPart, keys: list[str], inputs: list[dict[str, torch.Tensor]], last: bool) -> dict[str, Any]:
        stacked = {name: torch.stack([sample[name] for sample in inputs]) for name in inputs[0]} if inputs else None
        return {"part": part.name, "keys": keys, "inputs": stacked, "last": last}


class EncodeData(L.LightningDataModule):
    """The parts of this rank that are not finished yet, read by `num_workers` workers."""

    def __init__(self, parts: Sequence[InputPart], prepare: Prepare, out: Path, format: str, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.parts, self.prepare, self.out, self.format = list(parts), prepare, out, format
        self.batch_size, self.num_workers = batch_size, num_workers
        self.todo: list[InputPart] = []

    def predict_dataloader(self) -> SignalSafeLoader:
        rank, world_size = rank_and_world()
        # Split before looking at what is finished: ranks agree on the split whatever the others have done.
        self.todo = [part for part in self.parts[rank::world_size] if finished_record(self.out, part, self.format) is None]
        workers = min(self.num_workers, len(self.todo))
        dataset = PartBatches(self.todo, self.prepare, self.batch_size)
        return SignalSafeLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)


# ---- writing ----------------------------------------------------------------------------------------

Record = Mapping[str, torch.Tensor | np.ndarray | str]


class _TarSink:
    """A part's WebDataset shard (`<key>.<name>.npy` a tensor, `<key>.txt` a string), under a temporary name."""

    def __init__(self, path: Path) -> None:
        self.path, self.temporary = path, temporary_path(path)
        # A whole-second mtime: a fractional one costs every member an extra PAX header.
        self.writer = wds.TarWriter(str(self.temporary), mtime=int(time.time()))

    def write(self, key: str, record: Record) -> None:
        sample = {"__key__": key}
        for name, value in record.items():
            sample[name if isinstance(value, str) else f"{name}.npy"] = value if isinstance(value, str) else np.asarray(value)
        self.writer.write(sample)

    def publish(self) -> None:
        self.writer.close()
        publish(self.temporary, self.path)

    def discard(self) -> None:
        self.writer.close()
        self.temporary.unlink(missing_ok=True)


class _SafetensorsSink:
    """A part's safetensors file of stacked tensors, its keys in the metadata (strings are not kept)."""

    def __init__(self, path: Path) -> None:
        self.path, self.keys, self.records = path, [], []

    def write(self, key: str, record: Record) -> None:
        self.keys.append(key)
        self.records.append({name: torch.as_tensor(value) for name, value in record.items() if not isinstance(value, str)})

    def publish(self) -> None:
        names = self.records[0] if self.records else {}
        tensors = {name: torch.stack([r[name] for r in self.records]) for name in names}
        save_safetensors(tensors, self.path, metadata={"keys": json.dumps(self.keys)})

    def discard(self) -> None:
        self.records.clear()


_SINKS = {"webdataset": _TarSink, "safetensors": _SafetensorsSink}


class PartWriter(BasePredictionWriter):
    """Writes each predicted batch into its part's sink, and publishes the part on its last batch.
    A rank-0 progress bar counts images (its own rank's) and parts."""

    def __init__(self, out: Path, format: str) -> None:
        super().__init__(write_interval="batch")
        self.out, self.format = out, format
        self.counts: Counter[str] = Counter()
        self._open: dict[str, tuple[Any, int]] = {}  # part -> (sink, samples written)
        self._progress: tqdm | None = None
        self._parts: dict[str, InputPart] = {}  # this rank's parts to write, by name

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = {part.name: part for part in trainer.datamodule.todo}
        self._progress = tqdm(desc="encode", unit="img", disable=not trainer.is_global_zero, postfix={"parts": f"0/{len(self._parts)}"})

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        part = batch["part"]
        sink, written = self._open.get(part) or (_SINKS[self.format](output_path(self.out, part, self.format)), 0)
        for i, key in enumerate(batch["keys"]):
            sink.write(key, {name: value[i] for name, value in prediction.items()})
        self._open[part] = (sink, written + len(batch["keys"]))
        self._progress.update(len(batch["keys"]))
        if batch["last"]:
            self._finish(part, batch["skipped"], trainer.global_rank)

    def _finish(self, part: str, skipped: Mapping[str, int], rank: int) -> None:
        sink, samples = self._open.pop(part)
        record = {**self._parts[part].identity(), "samples": samples, "skipped": dict(skipped), "rank": rank}
        replace_file(record_path(self.out, part), (json.dumps(record, sort_keys=True) + "\n").encode())
        sink.publish()  # after its record: an output that exists is a finished part
        self.counts["encoded"] += samples
        self.counts["skipped"] += sum(n for reason, n in skipped.items() if reason != "bad_shard")
        self.counts["bad_shards"] += skipped.get("bad_shard", 0)
        self.counts["parts"] += 1
        self._progress.set_postfix(parts=f"{self.counts['parts']}/{len(self._parts)}")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for sink, _ in self._open.values():
            sink.discard()
        self._open.clear()
        self._close()

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.close()


# ---- the manifest and the job -------------------------------------------------------------------------


def claim_output(out: Path, settings: Mapping[str, Any]) -> None:
    """Record the job's settings in `out`, or check them against those recorded there. A folder that
    holds files but no manifest is no encoding's: refused, not written into (it may be the input)."""
    manifest = out / MANIFEST
    if not manifest.is_file() and out.is_dir():
        found = sorted(f for f in out.iterdir() if not is_temporary(f))  # a manifest being written, or a killed writer's
        if found:
            raise ConfigError(
                f"output={out} holds {len(found)} file(s) (e.g. {found[0].name}) and no {MANIFEST}: it is no encoding's "
                f"output; choose a new or empty folder"
            )
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("settings", {})
        changed = {key: (recorded.get(key), settings.get(key)) for key in {*recorded, *settings} if recorded.get(key) != settings.get(key)}
        if changed:
            differences = "; ".join(f"{key}: {was!r} there, {now!r} now" for key, (was, now) in sorted(changed.items()))
            raise ConfigError(
                f"{out} holds an encoding made with other settings ({differences}); choose another output, "
                f"or delete {out} to encode it again from the start"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    replace_file(manifest, (json.dumps({"settings": dict(settings), "parts": {}}, indent=2, sort_keys=True) + "\n").encode())


def check_part_inputs(out: Path, parts: Sequence[InputPart], format: str) -> None:
    """Refuse a part whose output would overwrite an input, or whose name `out` already holds for
    another input (another data set's shard of the same name): both would replace files without a word."""
    for part in parts:
        if _local(output_path(out, part.name, format)) == _local(part.source):
            raise ConfigError(f"output={out}: part {part.name}'s output would overwrite its own input {part.source}")
        try:
            recorded = json.loads(record_path(out, part.name).read_text()).get("input")
        except (OSError, ValueError):
            continue
        if recorded is not None and _local(recorded) != _local(part.source):
            raise ConfigError(
                f"output={out} holds part {part.name} encoded from {recorded}, not from {part.source}: another input's "
                f"encoding; choose another output"
            )


def _local(source: str | os.PathLike) -> str:
    """A source as one string whatever the working directory: local paths absolute, URLs and pipes as they are."""
    source = os.fspath(source)
    return source if "://" in source or source.startswith("pipe:") else os.path.abspath(source)


def write_manifest(out: Path, parts: Sequence[InputPart], format: str) -> dict[str, Any]:
    """The settings and the record of every finished part (with its input), and whether all are finished."""
    manifest = json.loads((out / MANIFEST).read_text())
    records = {part.name: finished_record(out, part, format) for part in parts}
    manifest["parts"] = {
        name: {"output": output_path(out, name, format).name, **record} for name, record in records.items() if record is not None
    }
    manifest["samples"] = sum(record["samples"] for record in manifest["parts"].values())
    manifest["complete"] = len(manifest["parts"]) == len(parts)
    replace_file(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def run_encode_job(
    encoder: L.LightningModule,
    parts: Sequence[InputPart],
    out: str | os.PathLike,
    *,
    settings: Mapping[str, Any],
    prepare: Prepare,
    format: str = "webdataset",
    batch_size: int = 64,
    num_workers: int = 2,
    make_trainer: Callable[..., L.Trainer] = L.Trainer,
    max_skip_fraction: float = 0.1,
) -> dict[str, int]:
    """Encode the unfinished `parts` into `out` with `encoder.predict_step` (a dict of per-sample tensors,
    on the CPU); `make_trainer` gives the launcher, devices and precision (a partial of `L.Trainer`).
    Returns this rank's counts: encoded and skipped images, bad shards, parts written. A finished job
    that skipped more than `max_skip_fraction` of its images (`check_skipped`) ends in a DataQualityError."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose {' or '.join(FORMATS)}")
    out = Path(out)
    claim_output(out, {**settings, "format": format})
    check_part_inputs(out, parts, format)
    for stale in remove_stale_temporaries(out):
        log.info("removed %s, left by an encode that was killed", stale)
    writer = PartWriter(out, format)
    trainer = make_trainer(callbacks=[writer], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data = EncodeData(parts, prepare, out, format, batch_size, num_workers)
    trainer.predict(encoder, datamodule=data, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        manifest = write_manifest(out, parts, format)
        if not manifest["complete"]:
            log.warning(
                "%d of %d parts of %s are not finished; run the job again to finish them",
                len(parts) - len(manifest["parts"]),
                len(parts),
                out,
            )
        else:
            check_skipped(manifest, max_skip_fraction, out)
    return dict(writer.counts)


MIN_IMAGES_FOR_SKIP_CHECK = 1000  # below it a few bad files are no verdict on the data, unless nothing was encoded


def check_skipped(manifest: Mapping[str, Any], max_skip_fraction: float, out: Path) -> None:
    """A finished job's skips, counted by reason over its parts: more than `max_skip_fraction` of its images
    (once it has read MIN_IMAGES_FOR_SKIP_CHECK), or every image, is a DataQualityError. Its outputs stay."""
    skipped: Counter[str] = Counter()
    for record in manifest["parts"].values():
        skipped.update({reason: n for reason, n in record["skipped"].items() if reason != "bad_shard"})
    total, seen = sum(skipped.values()), manifest["samples"] + sum(skipped.values())
    if manifest["samples"] == 0 or (seen >= MIN_IMAGES_FOR_SKIP_CHECK and total > max_skip_fraction * seen):
        reasons = describe_counts(dict(sorted(skipped.items()))) or "no images read"
        raise DataQualityError(
            f"{total} of {seen} images skipped (max_skip_fraction={max_skip_fraction}): {reasons}; the parts are in {out}, "
            f"its manifest.json names each part's skips"
        )
