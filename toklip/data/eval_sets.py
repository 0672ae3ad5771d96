"""Evaluation sets: class folders for zero-shot classification, captioned images for retrieval.

Zero-shot (ImageNet layout): one folder per class, sorted by name (WordNet ids for ImageNet). The
classnames come from `classnames.txt` in the root, else open_clip's ImageNet list when the folders
are the 1000 WordNet ids, else the folder names; templates from `templates.txt` (one `{}` pattern a
line), else open_clip's 80 OpenAI ImageNet templates.

Retrieval (COCO Karpathy): the reference's JSON lines, {"filename": ..., "caption": [...]} a line,
or Karpathy's `dataset_coco.json` (its `test` split by default).

Every image is checked to exist when the set is built; an image that cannot be read is an error
naming it. Nothing is ever substituted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .samples import SkippedSample, open_image
from .transforms import Transform

_WORDNET_ID = re.compile(r"n\d{8}")


def load_image(path: str | Path, transform: Transform) -> torch.Tensor:
    """Read an evaluation image; any failure names the file."""
    try:
        data = Path(path).read_bytes()
        return transform(open_image(data))
    except FileNotFoundError:
        raise FileNotFoundError(f"evaluation image missing: {path}") from None
    except SkippedSample as err:
        raise ValueError(f"evaluation image {path} cannot be used: {err}") from None


def check_images_exist(paths: list[Path], where: str) -> None:
    """All of `paths` are files, or one error that counts the missing and names the first."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images of {where} are missing, e.g. {missing[0]}")


class ZeroShotSet(Dataset):
    """(image, label) pairs from class folders, with the classnames and prompt templates."""

    def __init__(self, root: str | Path, transform: Transform) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"zero-shot set root is not a directory: {self.root}")
        folders = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith("."))
        if not folders:
            raise FileNotFoundError(f"zero-shot set root has no class folders: {self.root}")
        class_to_idx = {folder: index for index, folder in enumerate(folders)}  # hidden folders (.ipynb_checkpoints) are no class
        self.samples = [(Path(p), label) for p, label in make_dataset(str(self.root), class_to_idx, IMG_EXTENSIONS)]
        self.classnames = self._classnames(folders)
        self.templates = self._templates()
        self.transform = transform

    def _classnames(self, folders: list[str]) -> list[str]:
        listed = self.root / "classnames.txt"
        if listed.is_file():
            names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
            if len(names) != len(folders):
                raise ValueError(f"{listed} names {len(names)} classes, {self.root} has {len(folders)} class folders")
            return names
        if len(folders) == len(IMAGENET_CLASSNAMES) and all(_WORDNET_ID.fullmatch(f) for f in folders):
            return list(IMAGENET_CLASSNAMES)
        return [f.replace("_", " ") for f in folders]

    def _templates(self) -> list[Callable[[str], str]]:
        listed = self.root / "templates.txt"
        if not listed.is_file():
            return list(OPENAI_IMAGENET_TEMPLATES)
        patterns = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if not patterns or not all("{}" in p for p in patterns):
            raise ValueError(f"{listed}: every line must be a template with one {{}} for the class name")
        return [pattern.format for pattern in patterns]

    def prompts(self) -> list[list[str]]:
        """For every class, its name in every template."""
        return [[template(name) for template in self.templates] for name in self.classnames]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.transform), label


def _check_captions(captions: list[Any], where: str) -> None:
    """An image's captions: at least one, none blank (an image without one would count as a miss in
    retrieval, and CIDEr cannot score it)."""
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"{where}: an image needs at least one caption, none blank; got {captions!r}")


def read_retrieval_annotations(path: str | Path, split: str = "test") -> list[tuple[str, list[str]]]:
    """(relative image path, captions) from JSON lines or from Karpathy's dataset_coco.json."""
    path = Path(path)
    text = path.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSON lines
    if isinstance(whole, dict) and "images" in whole:
        entries = [
            (str(Path(image.get("filepath", "")) / image["filename"]), [s["raw"].strip() for s in image["sentences"]])
            for image in whole["images"]
            if image.get("split") == split
        ]
        if not entries:
            raise ValueError(f"{path}: no image in split {split!r}")
        for filename, captions in entries:
            _check_captions(captions, f"{path}: {filename}")
        return entries
    by_image: dict[str, list[str]] = {}  # lines naming one image add to its captions (one caption a line is common)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            filename, captions = record["filename"], record["caption"]
            captions = [captions] if isinstance(captions, str) else list(captions)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{path}:{number}: expected {{"filename": ..., "caption": [...]}} ({err})') from None
        _check_captions(captions, f"{path}:{number}")
        by_image.setdefault(filename, []).extend(captions)
    if not by_image:
        raise ValueError(f"{path}: no annotations")
    return list(by_image.items())


class RetrievalSet(Dataset):
    """(image, image index) pairs; `texts` holds every caption and `text_to_image` its image."""

    def __init__(self, captions: str | Path, images: str | Path, transform: Transform, split: str = "test") -> None:
        entries = read_retrieval_annotations(captions, split)
        root = Path(images)
        self.image_paths = [root / name for name, _ in entries]
        check_images_exist(self.image_paths, f"the retrieval set {captions}")
        self.texts = [caption for _, captions in entries for caption in captions]
        self.text_to_image = torch.tensor([i for i, (_, captions) in enumerate(entries) for _ in captions], dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.image_paths[index], self.transform), index


EvalSet = ZeroShotSet | RetrievalSet


def build_eval_set(spec: Mapping[str, Any], transform: Transform) -> EvalSet:
    """{"kind": "zeroshot", "root": ...} or {"kind": "retrieval", "captions": ..., "images": ..., "split": "test"}."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "zeroshot":
        return ZeroShotSet(transform=transform, **spec)
    if kind == "retrieval":
        return RetrievalSet(transform=transform, **spec)
    raise ValueError(f"evaluation set kind {kind!r}: choose zeroshot or retrieval")


def build_eval_sets(specs: Mapping[str, Mapping[str, Any]], transform: Transform) -> dict[str, EvalSet]:
    """Every evaluation set of a config's `eval.sets`, by name."""
    return {name: build_eval_set(spec, transform) for name, spec in specs.items()}
