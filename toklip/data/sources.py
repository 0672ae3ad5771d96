"""Shard sources: URL patterns -> lists of shard URLs, checked before any worker starts."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from webdataset.handlers import reraise_exception
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://")


@dataclass(frozen=True)
class ShardSource:
    pattern: str  # as the user wrote it, for messages
    urls: tuple[str, ...]
    weight: float = 1.0


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand a pattern (`/data/{00000..00099}.tar`); local paths may also use globs.

    Local shards must exist: an empty or partly missing expansion is an error naming the pattern.
    `pipe:` commands (how S3/GCS are read: `pipe:aws s3 cp s3://b/{0..9}.tar -`) and URLs are
    passed to webdataset as they are.
    """
    urls: list[str] = []
    for url in expand_urls(pattern):
        if url.startswith(_REMOTE_PREFIXES) or not glob.has_magic(url):
            urls.append(url)
        else:
            urls.extend(sorted(glob.glob(url)))
    local = [u for u in urls if not u.startswith(_REMOTE_PREFIXES)]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or (local and len(missing) == len(local)):
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist, e.g. {missing[0]}")
    return urls


def resolve_sources(patterns: str | Sequence[str], weights: Sequence[float] | None = None) -> list[ShardSource]:
    """One source per pattern; a string may hold several, separated by `::` (open_clip's syntax)."""
    if isinstance(patterns, str):
        patterns = patterns.split("::")
    patterns = [str(p) for p in patterns]
    if not patterns or not all(patterns):
        raise ValueError(f"empty shard pattern in {patterns!r}")
    if weights is None:
        weights = [1.0] * len(patterns)
    if len(weights) != len(patterns):
        raise ValueError(f"{len(weights)} source weights for {len(patterns)} sources ({patterns})")
    if any(w <= 0 for w in weights):
        raise ValueError(f"source weights must be positive, got {list(weights)}")
    return [ShardSource(p, tuple(expand_pattern(p)), float(w)) for p, w in zip(patterns, weights)]


def tar_samples(shards: Iterable[dict[str, str]], handler: Callable[[Exception], bool] = reraise_exception) -> Iterator[dict]:
    """webdataset samples of the shards ({"url": ...} each), in order; `handler` decides on a read error.

    webdataset's own `tarfile_samples` leaves each shard's file to the garbage collector: here it is
    closed once read (or when the iteration stops). A `pipe:` command's exit status stays unchecked.
    """

    def closing(streams: Iterator[dict]) -> Iterator[dict]:
        for source in streams:
            try:
                yield source
            finally:
                with contextlib.suppress(Exception):
                    source["stream"].close()

    return group_by_keys(tar_file_expander(closing(url_opener(shards, handler=handler)), handler=handler), handler=handler)
