"""One WebDataset sample -> {"image": tensor, "text": caption tokens}, or the reason it must be skipped."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Why a sample was skipped; each is counted and reported as data/skipped_<reason>.
SKIP_REASONS = ("no_image", "no_caption", "empty_caption", "corrupt_image", "too_large", "bad_record", "no_label")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb bound (about 0.25 GB as RGB)


class DataQualityError(RuntimeError):
    """Too many samples were skipped: the data, not the model, needs attention."""


def describe_counts(counts: Mapping[str, int]) -> str:
    """Counts by reason as the errors name them ("corrupt_image=8, bad_shard=1"), in the given order, zeros left out."""
    return ", ".join(f"{reason}={count}" for reason, count in counts.items() if count)


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, 16/32-bit and float rescaled."""
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a palette's transparency, or a colour key (PNG's tRNS)
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@contextlib.contextmanager
def _own_pixel_bound() -> Iterator[None]:
    """Pillow's decompression-bomb guard off while an image's header is read: `open_image` checks the
    size itself, before any pixel is decoded (Pillow's guard refuses twice its own bound, whatever ours is)."""
    pillows, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillows


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to RGB; the size is checked from the header before any pixel is decoded."""
    try:
        with _own_pixel_bound():
            image = Image.open(io.BytesIO(data))
    except Exception as err:  # PIL raises many types on garbage; all mean the same here
        raise SkippedSample("corrupt_image", f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SkippedSample("too_large", f"{width}x{height} > max_image_pixels={max_pixels}")
    try:
        image.load()
        return to_rgb(image)
    except Exception as err:
        raise SkippedSample("corrupt_image", f"{type(err).__name__}: {err}") from None


def label_of(sample: dict[str, Any]) -> int:
    """The class id from `cls` (a decimal number, as ImageNet's WebDataset shards write it)."""
    raw = sample.get("cls")
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise SkippedSample("no_label", "no cls" if raw is None else f"cls {raw[:20]!r} is not a class id") from None


def caption_of(sample: dict[str, Any]) -> str:
    """The caption from `txt`, else from json["caption"] (img2dataset writes both)."""
    if "txt" in sample:
        raw = sample["txt"]
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    elif "json" in sample:
        try:
            text = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            text = None
        if text is None:
            raise SkippedSample("no_caption", "json without a caption")
        text = str(text)
    else:
        raise SkippedSample("no_caption")
    text = text.strip()
    if not text:
        raise SkippedSample("empty_caption")
    return text


@dataclass
class SampleDecoder:
    """Turns a raw sample into {"image", "text" (tokens)}; picklable, so it runs in the loader's workers."""

    image_transform: Callable[[Image.Image], torch.Tensor]
    text_tokenizer: Callable[[list[str]], torch.Tensor]
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        data = image_bytes(sample)
        caption = caption_of(sample)
        image = open_image(data, self.max_image_pixels)
        return {"image": self.image_transform(image), "text": self.text_tokenizer([caption])[0]}


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The encoded image of a WebDataset sample (the first of IMAGE_EXTENSIONS it has)."""
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise SkippedSample("no_image")
    return data
