"""Encode images into TokLIP tokens for downstream models: VQ indices, per-token features, embeddings.

Outputs, one record per image under its key:
    indices    (h, w) int64   the VQ codes (what a generator predicts)
    tokens     (N, D)         causal per-token semantic features (what an MLLM reads)
    embedding  (D,)           the pooled, L2-normalised image embedding
as WebDataset shards (`<key>.indices.npy`, ...) or safetensors files of stacked tensors (keys in
their metadata).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
from tqdm.auto import tqdm

from .checkpoints import publish, remove_stale_temporaries, save_safetensors, temporary_path
from .data.samples import IMAGE_EXTENSIONS, SkippedSample, open_image
from .data.sources import resolve_sources, tar_samples
from .data.transforms import eval_transform
from .models.toklip import TokLIP

log = logging.getLogger(__name__)

FEATURES = ("indices", "tokens", "embedding")
FORMATS = ("webdataset", "safetensors")


def iter_images(source: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) from a folder (recursively, sorted; key = relative path without suffix)
    or from WebDataset shards (a pattern; key = the sample's key)."""
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        for path in files:
            yield str(path.relative_to(folder).with_suffix("")), path.read_bytes()
        return
    urls = [url for s in resolve_sources(str(source)) for url in s.urls]
    for sample in tar_samples({"url": url} for url in urls):
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            log.warning("sample %s of %s has no image; skipped", sample["__key__"], sample["__url__"])
            continue
        yield sample["__key__"], data


class _SafetensorsSink:
    def __init__(self, out: Path, per_file: int) -> None:
        self.out, self.per_file, self.records, self.files = out, per_file, [], []

    def write(self, key: str, record: dict[str, torch.Tensor]) -> None:
        self.records.append((key, record))
        if len(self.records) == self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        keys = [key for key, _ in self.records]
        tensors = {name: torch.stack([r[name] for _, r in self.records]) for name in self.records[0][1]}
        path = self.out / f"{len(self.files):06d}.safetensors"
        self.files.append(save_safetensors(tensors, path, metadata={"keys": json.dumps(keys)}))
        self.records = []

    def close(self) -> None:
        self.flush()


class _WebDatasetSink:
    """Shards written under a temporary name and renamed once whole: a kill never leaves half a shard."""

    def __init__(self, out: Path, per_file: int) -> None:
        pattern = temporary_path(out / "%06d.tar")
        self.writer = wds.ShardWriter(str(pattern), maxcount=per_file, verbose=0, post=self._publish)

    @staticmethod
    def _publish(written: str) -> None:
        temporary = Path(written)
        publish(temporary, temporary.with_name(temporary.name[1:].rsplit(".tmp-", 1)[0]))

    def write(self, key: str, record: dict[str, torch.Tensor]) -> None:
        self.writer.write({"__key__": key, **{f"{name}.npy": value.numpy() for name, value in record.items()}})

    def close(self) -> None:
        self.writer.close()


@torch.no_grad()
def encode_images(
    model: TokLIP,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "webdataset",
    features: Sequence[str] = FEATURES,
    batch_size: int = 64,
    samples_per_file: int = 1000,
    tokens_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> dict[str, int]:
    """Encode every image of `source` into `out`; unreadable images are skipped, counted and named."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose {' or '.join(FORMATS)}")
    unknown = set(features) - set(FEATURES)
    if unknown or not features:
        raise ValueError(f"features {sorted(unknown) or '[]'}: choose from {list(FEATURES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out):
        log.info("removed %s, left by an encode that was killed", stale)
    sink = (_WebDatasetSink if format == "webdataset" else _SafetensorsSink)(out, samples_per_file)
    model = model.to(device).eval()
    transform = eval_transform(model.preprocess_cfg)
    counts = {"encoded": 0, "skipped": 0}
    keys, images = [], []

    def flush() -> None:
        trunk = model.visual.trunk
        encoding = model.tokenizer.encode(torch.stack(images).to(device))
        tokens = trunk.features_from_codes(encoding.codes)
        outputs = {"indices": encoding.indices, "tokens": tokens.to(tokens_dtype), "embedding": F.normalize(trunk.pool(tokens), dim=-1)}
        for i, key in enumerate(keys):
            sink.write(key, {name: outputs[name][i].cpu() for name in features})
        counts["encoded"] += len(keys)
        keys.clear(), images.clear()

    for key, data in tqdm(iter_images(source), desc="encode", unit="img"):
        try:
            image = open_image(data)
        except SkippedSample as err:
            counts["skipped"] += 1
            log.warning("image %s skipped: %s", key, err)
            continue
        keys.append(key)
        images.append(transform(image))
        if len(keys) == batch_size:
            flush()
    if keys:
        flush()
    sink.close()
    return counts
