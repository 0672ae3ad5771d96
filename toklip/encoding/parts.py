"""The units of an encode job: each input shard, or each run of files of a folder, is one part with one
output file of its own, so that a job splits over ranks and workers and resumes part by part."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.samples import IMAGE_EXTENSIONS
from ..data.sources import resolve_sources, tar_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputPart:
    """One input shard (`source` a shard URL), or some files of a folder (`source` the folder, `files`
    relative to it: a caption in `<name>.txt` beside an image is read as its `txt`)."""

    name: str  # its output's base name
    source: str
    files: tuple[str, ...] = ()

    def identity(self) -> dict[str, str]:
        """What its record must name for an output to count as this part's: the input, and a folder part's files."""
        files = {"files_sha256": hashlib.sha256("\n".join(self.files).encode()).hexdigest()} if self.files else {}
        return {"input": self.source, **files}

    def samples(self) -> Iterator[dict[str, Any]]:
        """WebDataset-style samples ({"__key__", "<ext>": bytes, ...}); a damaged shard raises when read."""
        if not self.files:
            yield from tar_samples([{"url": self.source}])
            return
        folder = Path(self.source)
        for name in self.files:
            path = folder / name
            sample = {"__key__": folder_key(name), "__url__": str(path)}
            try:
                sample[path.suffix.lower().lstrip(".")] = path.read_bytes()
            except OSError as err:  # this image only (a broken link, no permission): skipped and counted as no_image
                log.warning("cannot read %s: %s", path, err)
            caption = path.with_suffix(".txt")
            if caption.is_file():
                sample["txt"] = caption.read_bytes()
            yield sample


def folder_key(name: str) -> str:
    """A folder image's sample key: its relative path without the extension, a dot in its name made `_`
    (a WebDataset reader ends a key at the name's first dot)."""
    path = Path(name)
    return str(path.parent / path.stem.replace(".", "_"))


def input_parts(source: str | os.PathLike, files_per_part: int = 1000) -> list[InputPart]:
    """The parts of `source`: a folder of images (recursively, sorted; `files_per_part` to a part, named
    000000, 000001, ...) or shard patterns (one part a shard, named as the shard without `.tar`)."""
    if not os.fspath(source).strip():
        raise ValueError("the input is empty: give a folder of images or shard patterns")  # Path("") is the working folder
    folder = Path(source)
    if folder.is_dir():
        found = (p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not p.is_dir())
        files = sorted(str(p.relative_to(folder)) for p in found)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        _check_keys_distinct(files, folder)
        runs = range(0, len(files), files_per_part)
        return [InputPart(f"{i:06d}", str(folder), tuple(files[start : start + files_per_part])) for i, start in enumerate(runs)]
    urls = [url for s in resolve_sources(str(source)) for url in s.urls]
    parts = [InputPart(_shard_name(url), url) for url in urls]
    repeated = [name for name, count in Counter(p.name for p in parts).items() if count > 1]
    if repeated:
        examples = [p.source for p in parts if p.name == repeated[0]]
        raise ValueError(f"input shards share an output name ({repeated[0]!r}: {', '.join(examples)}); give shards of distinct names")
    return parts


def _check_keys_distinct(files: list[str], folder: Path) -> None:
    """Two images with one key (`cat.jpg` and `cat.png`) would make an output no reader can read."""
    by_key: dict[str, list[str]] = {}
    for name in files:
        by_key.setdefault(folder_key(name), []).append(name)
    shared = [names for names in by_key.values() if len(names) > 1]
    if shared:
        raise ValueError(
            f"{len(shared)} key(s) under {folder} name more than one image, e.g. {' and '.join(shared[0])}; rename one of each"
        )


def _shard_name(url: str) -> str:
    name = url.rstrip("/ -").rsplit("/", 1)[-1]  # a pipe: command ends in its URL (and often a `-`)
    return name.removesuffix(".tar")
