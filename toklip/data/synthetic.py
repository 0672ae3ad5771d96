"""Procedurally drawn scenes with compositional captions: shards, a zero-shot set, a retrieval set.

A scene is one to three shapes (shape x colour x size x position) on an unevenly lit background; its caption
is read off the same attributes by a small grammar, so image and text agree by construction. Every
image is a pure function of (seed, split, index): the same seed writes the same bytes.

Layout written by `make_synthetic(out)`:
    out/train/000000.tar ...   img2dataset shards: <key>.jpg, <key>.txt, <key>.json
    out/zeroshot/<class>/*.jpg  one folder per class, with classnames.txt and templates.txt
    out/retrieval/images/*.jpg  and captions.jsonl, {"filename": ..., "caption": [...]} a line
    out/manifest.json           the parameters and scene vocabulary; an equal one means the set is already there
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageChops, ImageDraw
from tqdm.auto import tqdm

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (150, 50, 200),
}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240)}
BACKGROUND_SHADING = 30  # the largest brightness offset in a background's grid of light (see _shaded_background)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = {"small": 0.16, "large": 0.28}  # radius as a fraction of the side; a small shape still spans 2-3 tokens at 32 px
POSITIONS = {  # centre as fractions of the image side, and how a caption says it
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "center": ((0.5, 0.5), "in the middle"),
}
ATTRIBUTES = ("size", "colour", "shape")  # the order a noun phrase names them in
GENERIC_NOUN = "shape"
GENERIC_NOUN_RATE = 0.2


# Prompts in the captions' own grammar (as CLIP's ImageNet templates echo web alt-text), one per
# value of each attribute the classes leave free: those are averaged out of a class embedding.
def zeroshot_templates(class_attributes: tuple[str, ...]) -> list[str]:
    templates = ["a {}"]
    if "size" not in class_attributes:
        templates += [f"a {size} {{}}" for size in sorted(SIZES)]
    if "position" not in class_attributes and "background" not in class_attributes:  # positions precede backgrounds
        templates += [f"a {{}} {phrase}" for _, phrase in POSITIONS.values()]
    if "background" not in class_attributes:
        templates += [f"a {{}} on a {background} background" for background in sorted(BACKGROUNDS)]
    return templates


_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    position: str
    generic: bool = False  # named "shape" rather than by its kind, as people sometimes do

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {GENERIC_NOUN if self.generic else self.shape} {POSITIONS[self.position][1]}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self, style: int) -> str:
        """One of three phrasings of the same content."""
        objects = " and ".join(s.phrase() for s in self.shapes)
        if style == 0:
            return f"{objects} on a {self.background} background"
        if style == 1:
            return f"a {self.background} background with {objects}"
        return objects


def random_scene(rng: random.Random, max_shapes: int = 3, fixed: dict[str, str] | None = None) -> Scene:
    """A random scene; `fixed` pins attributes (and the background) of a single shape (zero-shot sets)."""
    fixed = dict(fixed or {})
    background = fixed.pop("background", None)
    count = 1 if fixed or background else rng.randint(1, max_shapes)
    positions = rng.sample(sorted(POSITIONS), count)
    shapes = []
    for position in positions:
        attrs = {
            "shape": rng.choice(SHAPES),
            "colour": rng.choice(sorted(COLOURS)),
            "size": rng.choice(sorted(SIZES)),
            "position": position,
            "generic": rng.random() < GENERIC_NOUN_RATE,
        }
        attrs.update(fixed)
        shapes.append(Shape(**attrs))
    return Scene(background or rng.choice(sorted(BACKGROUNDS)), tuple(shapes))


def _outline(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of circumradius r, rotated by `turn` radians."""

    def ring(n: int, radius_at, offset: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius_at(i) * math.cos(offset + turn + 2 * math.pi * i / n),
                cy + radius_at(i) * math.sin(offset + turn + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if shape == "circle":
        return ring(48, lambda i: r, 0.0)
    if shape == "square":
        return ring(4, lambda i: r, math.pi / 4)
    if shape == "diamond":
        return ring(4, lambda i: r, 0.0)
    if shape == "triangle":
        return ring(3, lambda i: r, -math.pi / 2)
    if shape == "star":
        return ring(10, lambda i: r if i % 2 == 0 else 0.45 * r, -math.pi / 2)
    if shape == "cross":
        w = 0.35 * r
        arm = [(w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w), (r, w)]
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw a scene; positions, sizes and rotations jitter a little, colours a little more."""
    side = image_size * _SUPERSAMPLE
    image = _shaded_background(BACKGROUNDS[scene.background], side, rng)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        (fx, fy), _ = POSITIONS[shape.position]
        cx = (fx + rng.uniform(-0.05, 0.05)) * side
        cy = (fy + rng.uniform(-0.05, 0.05)) * side
        r = SIZES[shape.size] * rng.uniform(0.9, 1.1) * side
        turn = 0.0 if shape.shape == "circle" else rng.uniform(-0.25, 0.25)
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[shape.colour])
        draw.polygon(_outline(shape.shape, cx, cy, r, turn), fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _shaded_background(colour: tuple[int, int, int], side: int, rng: random.Random) -> Image.Image:
    """One colour under smooth uneven light: a random 3x3 grid of brightness offsets, interpolated bicubically.

    On a flat background a learned embedding of raw VQ codes reads the background, and a shape's size
    against it, from a handful of questions: a world no photograph is. Uneven light spreads a background
    over more codes, as real backgrounds are (the comprehension stage in the README measures both)."""
    grid = Image.new("L", (3, 3))
    grid.putdata([128 + rng.randint(-BACKGROUND_SHADING, BACKGROUND_SHADING) for _ in range(9)])
    shade = grid.resize((side, side), Image.Resampling.BICUBIC)
    return Image.merge("RGB", [ImageChops.add(Image.new("L", (side, side), c), shade, offset=-128) for c in colour])


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The random source of one image of a split: every image is a pure function of (seed, split, index)."""
    return random.Random(f"{seed}/{split}/{index}")


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    image_size: int = 64
    train_samples: int = 4096
    samples_per_shard: int = 512
    max_shapes: int = 3
    zeroshot_classes: tuple[str, ...] = ("colour", "size", "background")  # attributes whose combinations are the classes
    zeroshot_per_class: int = 10
    retrieval_images: int = 200
    captions_per_image: int = 2

    @classmethod
    def from_options(cls, options: dict) -> SyntheticConfig:
        """From plain config values (lists where the dataclass keeps tuples)."""
        return cls(**{**options, "zeroshot_classes": tuple(options.get("zeroshot_classes", cls.zeroshot_classes))})


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    train_urls: str  # a brace pattern over the shards
    zeroshot: Path
    retrieval_captions: Path
    retrieval_images: Path


def _paths(root: Path, cfg: SyntheticConfig) -> SyntheticPaths:
    last = max(math.ceil(cfg.train_samples / cfg.samples_per_shard) - 1, 0)
    pattern = f"{{000000..{last:06d}}}" if last else "000000"
    return SyntheticPaths(
        root=root,
        train_urls=str(root / "train" / f"{pattern}.tar"),
        zeroshot=root / "zeroshot",
        retrieval_captions=root / "retrieval" / "captions.jsonl",
        retrieval_images=root / "retrieval" / "images",
    )


def zeroshot_classes(attributes: tuple[str, ...]) -> list[dict[str, str]]:
    """Every combination of the named attributes' values, as {attribute: value} dicts."""
    values = {
        "shape": SHAPES,
        "colour": sorted(COLOURS),
        "size": sorted(SIZES),
        "position": list(POSITIONS),
        "background": sorted(BACKGROUNDS),
    }
    unknown = set(attributes) - set(values)
    if unknown:
        raise ValueError(f"unknown zero-shot attribute(s) {sorted(unknown)}; choose from {sorted(values)}")
    return [dict(zip(attributes, combo)) for combo in itertools.product(*(values[a] for a in attributes))]


def _classname(fixed: dict[str, str]) -> str:
    """The class's words in the grammar's order; "shape" stands in when the kind is left free."""
    words = [fixed[a] for a in ("size", "colour") if a in fixed] + [fixed.get("shape", GENERIC_NOUN)]
    if "position" in fixed:
        words.append(POSITIONS[fixed["position"]][1])
    if "background" in fixed:
        words.append(f"on a {fixed['background']} background")
    return " ".join(words)


def write_train_shards(paths: SyntheticPaths, cfg: SyntheticConfig) -> None:
    shard_dir = paths.root / "train"
    shard_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(shard_dir / "%06d.tar")
    with wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, verbose=0) as sink:
        for index in tqdm(range(cfg.train_samples), desc="train shards", unit="img", leave=False):
            rng = scene_rng(cfg.seed, "train", index)
            scene = random_scene(rng, cfg.max_shapes)
            caption = scene.caption(rng.randrange(3))
            key = f"{index:09d}"
            meta = {"key": key, "caption": caption, "width": cfg.image_size, "height": cfg.image_size, "scene": dataclasses.asdict(scene)}
            sink.write({"__key__": key, "jpg": _jpeg(render(scene, cfg.image_size, rng)), "txt": caption, "json": json.dumps(meta)})


def write_zeroshot(paths: SyntheticPaths, cfg: SyntheticConfig) -> None:
    classes = zeroshot_classes(cfg.zeroshot_classes)
    names = [_classname(fixed) for fixed in classes]
    paths.zeroshot.mkdir(parents=True, exist_ok=True)
    index = 0
    # Folders are numbered so that their sorted order is the order of classnames.txt.
    for label, fixed in enumerate(tqdm(classes, desc="zero-shot set", unit="class", leave=False)):
        folder = paths.zeroshot / f"{label:04d}_{names[label].replace(' ', '_')}"
        folder.mkdir(exist_ok=True)
        for i in range(cfg.zeroshot_per_class):
            rng = scene_rng(cfg.seed, "zeroshot", index)
            index += 1
            render(random_scene(rng, fixed=fixed), cfg.image_size, rng).save(folder / f"{i:05d}.jpg", quality=95)
    (paths.zeroshot / "classnames.txt").write_text("\n".join(names) + "\n")
    (paths.zeroshot / "templates.txt").write_text("\n".join(zeroshot_templates(cfg.zeroshot_classes)) + "\n")


def write_retrieval(paths: SyntheticPaths, cfg: SyntheticConfig) -> None:
    paths.retrieval_images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in tqdm(range(cfg.retrieval_images), desc="retrieval set", unit="img", leave=False):
        rng = scene_rng(cfg.seed, "retrieval", index)
        scene = random_scene(rng, cfg.max_shapes)
        filename = f"{index:06d}.jpg"
        render(scene, cfg.image_size, rng).save(paths.retrieval_images / filename, quality=95)
        captions = [scene.caption(style) for style in rng.sample(range(3), cfg.captions_per_image)]
        lines.append(json.dumps({"filename": filename, "caption": captions}))
    paths.retrieval_captions.write_text("\n".join(lines) + "\n")


def scene_vocabulary() -> dict:
    """What this version of the code draws scenes with: a set drawn with other colours, sizes or shading
    must not be taken for the current one, so every written set's manifest records it."""
    return {
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
        "background_shading": BACKGROUND_SHADING,
        "shapes": SHAPES,
        "sizes": SIZES,
        "positions": POSITIONS,
    }


def _manifest(cfg: SyntheticConfig) -> dict:
    """What a written set depends on: its parameters and the scene vocabulary."""
    return {**dataclasses.asdict(cfg), "vocabulary": scene_vocabulary()}


def make_synthetic(root: str | Path, cfg: SyntheticConfig = SyntheticConfig(), *, overwrite: bool = False) -> SyntheticPaths:
    """Write (or find already written, for the same parameters) the synthetic shards and eval sets."""
    if cfg.captions_per_image > 3:
        raise ValueError("captions_per_image: the grammar has three phrasings of a scene")
    root = Path(root)
    paths = _paths(root, cfg)
    manifest = root / "manifest.json"
    wanted = json.dumps(_manifest(cfg), sort_keys=True)
    if manifest.is_file() and not overwrite:
        if manifest.read_text() == wanted:
            return paths
        raise FileExistsError(
            f"{root} holds a synthetic set made with other parameters or another scene vocabulary ({manifest}); "
            "delete it, pass overwrite=True, or choose another directory"
        )
    for part in ("train", "zeroshot", "retrieval"):
        shutil.rmtree(root / part, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    write_train_shards(paths, cfg)
    write_zeroshot(paths, cfg)
    write_retrieval(paths, cfg)
    manifest.write_text(wanted)  # last: a set interrupted half-way is never taken as complete
    return paths
