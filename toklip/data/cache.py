"""Training from a cache written by `toklip-cache`: the frozen networks' outputs, read instead of computed.

A cache shard holds, per sample, `indices.npy` (views, h, w), `teacher_features.npy` (views, D),
optionally `teacher_tokens.npy` (views, N, D), `text_features.npy` (D,) and, made with `labels=true`,
`label.npy` (the class id of the shard's `cls`); its directory's
`manifest.json` records how it was made. The stream is the training stream (`ShardStream`: the same
epochs, shuffles, resampling, resume without replay and skip counts); each sample gives one of its
views, drawn from the stream's seeded generator, so an epoch picks afresh and a resumed run picks
as the first did.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from .datamodule import TokLIPDataModule
from .samples import SkippedSample
from .sources import resolve_sources

MANIFEST = "manifest.json"  # an encode job's record of its output (toklip.encoding.job writes it)
_VIEWED = ("indices", "teacher_features", "teacher_tokens")  # one entry a view
_INTEGER = ("indices", "label")


@dataclass(frozen=True)
class CachedSample:
    """A raw cache sample -> {"indices", "teacher_features", "text_features"} (and "teacher_tokens",
    "label") of one view, as int64 / float32 tensors; a record that does not read is skipped as `bad_record`."""

    teacher_tokens: bool = False
    captions: bool = True
    labels: bool = False

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        optional = {"teacher_tokens": self.teacher_tokens, "text_features": self.captions, "label": self.labels}
        names = ("indices", "teacher_features", *(name for name, wanted in optional.items() if wanted))
        missing = [f"{name}.npy" for name in names if f"{name}.npy" not in sample]
        if missing:
            raise SkippedSample("bad_record", f"no {', '.join(missing)}")
        try:
            arrays = {name: np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False) for name in names}
        except (ValueError, OSError, EOFError) as err:
            raise SkippedSample("bad_record", f"{type(err).__name__}: {err}") from None
        views = len(arrays["indices"])
        if any(len(arrays[name]) != views for name in names if name in _VIEWED):
            raise SkippedSample("bad_record", "its views disagree in number")
        view = int(torch.randint(views, ()))  # the stream seeds the generator per sample position
        return {
            name: torch.from_numpy(array[view] if name in _VIEWED else array).to(torch.int64 if name in _INTEGER else torch.float32)
            for name, array in arrays.items()
        }  # fmt: skip


def read_cache_manifest(train_urls: str | Sequence[str]) -> dict[str, Any]:
    """The manifest of the cache the shards belong to (one for all their directories): its settings and samples."""
    directories = sorted({str(Path(url).parent) for source in resolve_sources(train_urls) for url in source.urls})
    manifests = {}
    for directory in directories:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ConfigError(f"data.train_urls: {directory} has no {MANIFEST}; is it a cache written by toklip-cache?")
        manifest = json.loads(path.read_text())
        if manifest.get("settings", {}).get("kind") != "cache":
            raise ConfigError(f"data.train_urls: {path} describes no training cache (toklip-encode output is not one; use toklip-cache)")
        if not manifest.get("complete"):
            raise ConfigError(f"data.train_urls: the cache in {directory} is not finished; run its toklip-cache command again to finish it")
        manifests[directory] = manifest
    first = manifests[directories[0]]
    for directory, manifest in manifests.items():
        if manifest["settings"] != first["settings"]:
            raise ConfigError(f"data.train_urls: the caches in {directories[0]} and {directory} were made with other settings")
    return {"settings": first["settings"], "samples": sum(m["samples"] for m in manifests.values())}


class CacheDataModule(TokLIPDataModule):
    """Streams a training cache (`data=cache`): `train_urls` are its shards; `train_num_samples`
    defaults to its sample count. There are no evaluation sets: the model has no image side to run
    them; evaluate the export with `toklip-eval`. The other options are TokLIPDataModule's."""

    def __init__(
        self,
        train_urls: str | Sequence[str],
        *,
        train_num_samples: int | None = None,
        read_teacher_tokens: bool = False,
        eval_sets: Mapping[str, Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        if eval_sets:
            raise ConfigError(
                f"data=cache has no image side to validate with (eval sets {', '.join(eval_sets)}): use eval=none, then evaluate "
                "the export with toklip-eval"
            )
        self.manifest = read_cache_manifest(train_urls)
        settings = self.manifest["settings"]
        super().__init__(
            train_urls, text_tokenizer=None, image_size=settings["resolution"],
            train_num_samples=train_num_samples or self.manifest["samples"], **options,
        )  # fmt: skip
        if read_teacher_tokens and not settings["teacher_tokens"]:
            raise ConfigError("data.read_teacher_tokens=true: this cache holds no teacher patch tokens (make it with teacher_tokens=true)")
        self.read_teacher_tokens = read_teacher_tokens

    @property
    def has_labels(self) -> bool:
        """Whether the cache holds each sample's class id (made with labels=true)."""
        return bool(self.manifest["settings"].get("labels"))

    @property
    def has_captions(self) -> bool:
        """Whether the cache holds each sample's caption embedding (made with captions=true, the default)."""
        return self.manifest["settings"].get("captions", True)

    def sample_decoder(self) -> CachedSample:
        return CachedSample(self.read_teacher_tokens, self.has_captions, self.has_labels)

    def check_model(self, architecture: Mapping[str, Any], codebook_sha256: str, teacher_sha256: str | None) -> None:
        """The model must be the one whose frozen networks made the cache: the same parts, codebook and
        teacher file (its embeddings are the cache's targets; it also starts the student and gives the text tower)."""
        settings = self.manifest["settings"]
        if dict(architecture) != settings["architecture"]:
            raise ConfigError(f"the cache was made for the model {settings['architecture']}, not {dict(architecture)}")
        if not self.has_captions:
            raise ConfigError("the cache holds no caption embeddings (made with captions=false): TokLIP cannot train from it")
        self.check_codebook(codebook_sha256, settings["resolution"])
        if "teacher_sha256" in settings and teacher_sha256 != settings["teacher_sha256"]:  # caches before it was recorded: unchecked
            raise ConfigError(f"the cache was made with another teacher ({settings['teacher']}) than this run's teacher.checkpoint")

    def check_codebook(self, codebook_sha256: str, resolution: int) -> None:
        """The cache's indices must be of this codebook, on this token grid (the image resolution)."""
        settings = self.manifest["settings"]
        if codebook_sha256 != settings["codebook_sha256"]:
            raise ConfigError(
                f"the cache's indices refer to another codebook than the model's tokenizer (the cache was made with {settings['tokenizer']})"
            )
        if resolution != settings["resolution"]:
            raise ConfigError(f"the cache holds the tokens of {settings['resolution']} px images, the model takes {resolution} px")
