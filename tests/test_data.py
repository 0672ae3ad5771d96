"""The data layer: shards, splitting, skips, transforms, evaluation sets, the synthetic generator."""

import importlib
import io
import json
import logging
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import toklip
from toklip.data import DataQualityError, TokLIPDataModule, make_synthetic, synthetic, to_rgb, workers
from toklip.data.eval_sets import RetrievalSet, ZeroShotSet, read_retrieval_annotations
from toklip.data.samples import SkippedSample, open_image
from toklip.data.synthetic import COLOURS, SyntheticConfig
from toklip.data.transforms import eval_transform, preprocess_config
from toklip.training import known_warnings


def png(colour=(10, 20, 30), size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def numbered_sample(index: int) -> dict:
    """A sample whose caption carries its index (the test tokenizer reads it back)."""
    return {"__key__": f"{index:06d}", "png": png(), "txt": f"sample {index}"}


def index_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[int(t.split()[-1])] for t in texts])


def write_shards(directory, samples: list[dict], per_shard: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for start in range(0, len(samples), per_shard):
        with wds.TarWriter(str(directory / f"{count:04d}.tar")) as sink:
            for sample in samples[start : start + per_shard]:
                sink.write(sample)
        count += 1
    return str(directory / f"{{0000..{count - 1:04d}}}.tar")


def datamodule(urls, **overrides) -> TokLIPDataModule:
    options = dict(
        text_tokenizer=index_tokenizer, image_size=8, batch_size_per_device=5, num_workers=0,
        shard_shuffle=(0, 0), sample_shuffle=(0, 0), min_samples_for_skip_check=10_000,
    )  # fmt: skip
    options.update(overrides)
    return TokLIPDataModule(urls, **options)


def indices_of(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["text"][:, 0]]


@pytest.fixture
def eighty(tmp_path):
    """80 numbered samples in 8 shards of 10."""
    return write_shards(tmp_path / "shards", [numbered_sample(i) for i in range(80)], per_shard=10)


def test_round_trip_of_shards(tmp_path):
    captions = ["a red circle", "a blue square", "two green stars"]
    samples = [{"__key__": f"{i}", "jpg": png((40 * i, 0, 0)), "txt": c} for i, c in enumerate(captions)]
    urls = write_shards(tmp_path / "s", samples, per_shard=3)
    tokenizer = toklip.get_text_tokenizer("tiny_64")
    dm = TokLIPDataModule(urls, text_tokenizer=tokenizer, image_size=8, train_num_samples=3, batch_size_per_device=3,
                          num_workers=0, shard_shuffle=(0, 0), sample_shuffle=(0, 0), crop_scale=(1.0, 1.0))  # fmt: skip
    (batch,) = list(dm.train_loader())
    assert torch.equal(batch["text"], tokenizer(captions))
    assert batch["image"].shape == (3, 3, 8, 8)
    # Uniform images survive the crop exactly; pixels are normalised to [-1, 1].
    red = (batch["image"][:, 0].mean(dim=(1, 2)) * 0.5 + 0.5) * 255
    assert torch.allclose(red, torch.tensor([0.0, 40.0, 80.0]), atol=0.5)
    assert batch["stream"].tolist()[:3] == [0, 3, 1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_two_workers_see_every_sample_once(eighty, num_workers):
    dm = datamodule(eighty, train_num_samples=80, num_workers=num_workers, persistent_workers=False,
                    shard_shuffle=(2000, 500), sample_shuffle=(50, 10))  # fmt: skip
    seen = []
    for rank in range(2):
        loader = dm.train_loader(rank, world_size=2)
        got = indices_of(loader)
        assert len(got) == len(loader) * 5 == 40
        seen += got
    assert sorted(seen) == list(range(80))


def test_resampled_streams_differ_by_rank_and_worker(eighty):
    dm = datamodule(eighty, train_num_samples=40, resampled=True, sample_shuffle=(20, 5))
    streams = {}
    for rank in range(2):
        for worker in range(2):
            stream = dm.train_stream(rank, world_size=2)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("toklip.data.stream._worker", lambda w=worker: (w, 2))
                streams[rank, worker] = [int(i) for b in stream if "text" in b for i in b["text"][:, 0]]  # not the closing report
    assert all(len(s) == 10 for s in streams.values())  # 4 batches a rank, 2 a worker
    assert len({tuple(s) for s in streams.values()}) == 4
    # ... in the shards they draw (sample i lies in shard i // 10), not only in the sample shuffle's order.
    assert len({frozenset(i // 10 for i in s) for s in streams.values()}) == 4


def test_stream_is_deterministic_for_a_seed_and_reshuffles_by_epoch(eighty):
    def run(seed, epoch=0):
        dm = datamodule(eighty, train_num_samples=40, seed=seed, shard_shuffle=(2000, 500), sample_shuffle=(30, 10))
        dm._epoch.set(epoch)
        return indices_of(dm.train_loader())

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0, epoch=1) != run(0, epoch=0)


def test_weighted_sources_need_resampling(tmp_path, eighty):
    other = write_shards(tmp_path / "other", [numbered_sample(1000 + i) for i in range(20)], per_shard=10)
    with pytest.raises(ValueError, match="resampled=True"):
        datamodule([eighty, other], train_weights=[1.0, 3.0], train_num_samples=20).train_stream()
    dm = datamodule([eighty, other], train_weights=[1.0, 9.0], train_num_samples=200, resampled=True)
    got = indices_of(dm.train_loader())
    assert sum(i >= 1000 for i in got) > 0.75 * len(got)  # about 90% from the weight-9 source


def test_sources_errors_name_the_pattern(tmp_path, eighty):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        datamodule(str(tmp_path / "nothing-here-{0..3}.tar"), train_num_samples=10).train_stream()
    with pytest.raises(ValueError, match="train_num_samples"):
        datamodule(eighty).train_stream()
    with pytest.raises(ValueError, match="train_urls"):
        datamodule(None, train_num_samples=10).train_stream()
    with pytest.raises(ValueError, match="8 shards for 3 ranks x 3 workers"):
        datamodule(eighty, train_num_samples=80, num_workers=3).train_stream(0, 3).check_split(3)


def test_pipe_sources_are_read(eighty, tmp_path):
    first = eighty.replace("{0000..0007}", "0000")
    dm = datamodule(f"pipe:cat {first}", train_num_samples=10)
    assert indices_of(dm.train_loader()) == list(range(10))


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data needed to read its size)."""
    data = bytearray(png(size=(1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    good = [numbered_sample(i) for i in range(10)]
    bad = [
        {"__key__": "b0", "jpg": b"not an image at all", "txt": "sample 100"},
        {"__key__": "b1", "txt": "sample 101"},
        {"__key__": "b2", "png": png()},
        {"__key__": "b3", "png": png(), "txt": "   "},
        {"__key__": "b4", "png": huge_png_header(5000, 5000), "txt": "sample 104"},
        {"__key__": "b5", "png": png(), "json": json.dumps({"caption": "sample 105"})},
        {"__key__": "b6", "png": png()[:40], "txt": "sample 106"},  # truncated image bytes
    ]
    urls = write_shards(tmp_path / "bad", good[:5] + bad + good[5:], per_shard=100)
    dm = datamodule(urls, train_num_samples=15, batch_size_per_device=1, max_image_pixels=1_000_000)
    got = []
    for batch in dm.train_loader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert "stream" not in batch
        got += batch["text"][:, 0].tolist()
    assert sorted(got) == [*range(10), 105]  # json captions are read
    assert dm.skip_counts() == {
        "no_image": 1,
        "no_caption": 1,
        "empty_caption": 1,
        "corrupt_image": 2,
        "too_large": 1,
        "bad_record": 0,
        "no_label": 0,
        "bad_shard": 0,
    }
    metrics = dm.data_metrics()
    assert metrics["data/skipped_corrupt_image"] == 2.0 and metrics["data/bad_shards"] == 0.0


def test_truncated_shard_ends_with_a_warning_and_the_stream_goes_on(tmp_path, caplog):
    urls = write_shards(tmp_path / "t", [numbered_sample(i) for i in range(30)], per_shard=10)
    middle = tmp_path / "t" / "0001.tar"
    middle.write_bytes(middle.read_bytes()[:3000])  # cut inside the shard
    dm = datamodule(urls, train_num_samples=30, batch_size_per_device=1, max_skip_fraction=0.5)  # a third of the epoch lost
    with caplog.at_level(logging.WARNING):
        got = []
        for batch in dm.train_loader():
            got += dm.on_before_batch_transfer(batch, 0)["text"][:, 0].tolist()
    assert set(range(10)) | set(range(20, 30)) <= set(got)
    assert not set(got) - set(range(30))
    assert dm.skip_counts()["bad_shard"] == 1
    assert "shard " in caplog.text and "0001.tar is damaged" in caplog.text


def test_too_many_skips_stop_the_run_with_the_reasons(tmp_path):
    samples = [numbered_sample(i) for i in range(20)]
    for s in samples[::2]:
        s["png"] = b"garbage"
    urls = write_shards(tmp_path / "mostly-bad", samples, per_shard=20)
    dm = datamodule(urls, train_num_samples=10, batch_size_per_device=1, max_skip_fraction=0.2, min_samples_for_skip_check=8)
    with pytest.raises(DataQualityError, match=r"corrupt_image=\d+"):
        for batch in dm.train_loader():
            dm.on_before_batch_transfer(batch, 0)


def test_resume_continues_the_stream_without_replay(eighty, monkeypatch):
    def make():
        return datamodule(eighty, train_num_samples=80, shard_shuffle=(2000, 500), sample_shuffle=(30, 10))

    full = indices_of(make().train_loader())
    first = make()
    head = []
    for batch in first.train_loader():
        head += first.on_before_batch_transfer(batch, 0)["text"][:, 0].tolist()
        if len(head) == 35:
            break
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    decoded = []
    real_open = toklip.data.samples.open_image
    monkeypatch.setattr("toklip.data.samples.open_image", lambda data, *a: decoded.append(1) or real_open(data, *a))
    tail = indices_of(resumed.train_loader())
    assert head + tail == full
    assert len(decoded) == len(tail)  # the first 35 samples were skipped, not decoded again


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), (255, 255, 255)),  # fully transparent -> white
        ("LA", (100, 255), (100, 100, 100)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb(mode, colour, expected):
    image = to_rgb(Image.new(mode, (4, 4), colour))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == expected


def test_palette_with_transparency_becomes_rgb():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([200, 10, 10] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    del image.info["transparency"]
    assert to_rgb(image).getpixel((0, 0)) == (200, 10, 10)
    for mode, key in (("RGB", (0, 0, 0)), ("L", 0)):  # a colour key (PNG's tRNS) on a plain image
        buffer = io.BytesIO()
        Image.new(mode, (4, 4)).save(buffer, format="PNG", transparency=key)
        assert open_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_guard_reads_only_the_header():
    with pytest.raises(SkippedSample, match="too_large"):
        open_image(huge_png_header(100_000, 100_000))  # 10 G pixels: would need 30 GB to decode
    with pytest.raises(SkippedSample, match="too_large"):  # a header with no pixels after it: decoding it would fail
        open_image(huge_png_header(5000, 5000), max_pixels=1_000_000)  # under PIL's own bound: ours decides, unread
    with pytest.raises(SkippedSample, match="too_large"):
        open_image(png(size=(40, 40)), max_pixels=1000)
    assert open_image(png(size=(40, 40)), max_pixels=1600).size == (40, 40)
    # A bound raised past twice Pillow's own (179 M pixels) is ours to apply: the image is let through to decoding.
    with pytest.raises(SkippedSample, match="corrupt_image"):  # the header has no pixels after it
        open_image(huge_png_header(15_000, 12_000), max_pixels=300_000_000)


def test_eval_transforms_squash_or_crop():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left quarter
    squash = eval_transform(preprocess_config(16, resize_mode="squash"))(wide)
    crop = eval_transform(preprocess_config(16))(wide)
    assert squash.shape == crop.shape == (3, 16, 16)
    assert squash[2, 8, 0] > 0.9  # squash keeps the band
    assert crop[2, 8, 0] < -0.9  # the centre crop cuts it off


def make_class_folders(root, names, per_class=2):
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (12, 10), (i, j, 0)).save(root / name / f"{j}.png")


def test_zeroshot_set_from_class_folders(tmp_path):
    transform = eval_transform(preprocess_config(8))
    make_class_folders(tmp_path / "plain", ["tabby_cat", "golden_retriever", ".ipynb_checkpoints"])  # a hidden folder: no class
    plain = ZeroShotSet(tmp_path / "plain", transform)
    assert plain.classnames == ["golden retriever", "tabby cat"]  # sorted folders
    assert len(plain) == 4 and plain[3][1] == 1 and plain[0][0].shape == (3, 8, 8)
    assert plain.prompts()[0][0] == "a bad photo of a golden retriever."  # open_clip's OpenAI templates
    assert len(plain.templates) == 80

    make_class_folders(tmp_path / "named", ["b", "a"])
    (tmp_path / "named" / "classnames.txt").write_text("apple\nbanana\n")
    (tmp_path / "named" / "templates.txt").write_text("a photo of a {}.\n{} on white.\n")
    named = ZeroShotSet(tmp_path / "named", transform)
    assert named.prompts() == [["a photo of a apple.", "apple on white."], ["a photo of a banana.", "banana on white."]]


def test_imagenet_folders_get_imagenet_classnames(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    make_class_folders(tmp_path / "imagenet", wnids, per_class=1)
    dataset = ZeroShotSet(tmp_path / "imagenet", eval_transform(preprocess_config(8)))
    assert dataset.classnames[:2] == ["tench", "goldfish"] and len(dataset.classnames) == 1000


def test_unreadable_eval_image_is_an_error_naming_it(tmp_path):
    make_class_folders(tmp_path / "z", ["a", "b"])
    (tmp_path / "z" / "b" / "1.png").write_bytes(b"broken")
    dataset = ZeroShotSet(tmp_path / "z", eval_transform(preprocess_config(8)))
    with pytest.raises(ValueError, match=r"b/1\.png"):
        dataset[3]


def write_coco_images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 12)).save(root / name)


def test_retrieval_set_from_reference_json_lines(tmp_path):
    names = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    write_coco_images(tmp_path / "images", names)
    lines = [{"filename": names[0], "caption": ["a dog.", "a brown dog."]}, {"filename": names[1], "caption": ["a cat.", "x", "y"]}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = RetrievalSet(tmp_path / "test.jsonl", tmp_path / "images", eval_transform(preprocess_config(8)))
    assert dataset.texts == ["a dog.", "a brown dog.", "a cat.", "x", "y"]
    assert dataset.text_to_image.tolist() == [0, 0, 1, 1, 1]
    image, index = dataset[1]
    assert image.shape == (3, 8, 8) and index == 1


def test_retrieval_set_from_karpathy_json(tmp_path):
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "one "}, {"raw": "two"}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "val", "sentences": [{"raw": "three"}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": "four"}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    assert read_retrieval_annotations(tmp_path / "dataset_coco.json") == [("val2014/a.jpg", ["one", "two"]), ("val2014/c.jpg", ["four"])]
    write_coco_images(tmp_path, ["val2014/a.jpg"])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images .* missing, e.g. .*val2014/c\.jpg"):
        RetrievalSet(tmp_path / "dataset_coco.json", tmp_path, eval_transform(preprocess_config(8)))


def test_json_lines_naming_one_image_add_to_its_captions(tmp_path):
    lines = [{"filename": "a.jpg", "caption": "one"}, {"filename": "b.jpg", "caption": ["two"]}, {"filename": "a.jpg", "caption": "three"}]
    (tmp_path / "c.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert read_retrieval_annotations(tmp_path / "c.jsonl") == [("a.jpg", ["one", "three"]), ("b.jpg", ["two"])]  # not three images


def test_malformed_json_lines_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"filename": "a.jpg", "caption": ["x"]}\n{"file": "b.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_retrieval_annotations(tmp_path / "bad.jsonl")
    # An image without a caption would count as a retrieval miss (and CIDEr cannot score it): refused.
    for captions in ([], ["x", " "]):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"filename": "a.jpg", "caption": captions}) + "\n")
        with pytest.raises(ValueError, match=r"bad\.jsonl:1: an image needs at least one caption, none blank"):
            read_retrieval_annotations(tmp_path / "bad.jsonl")
    images = [{"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": []}]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"dataset_coco\.json: val2014/a\.jpg: an image needs at least one caption"):
        read_retrieval_annotations(tmp_path / "dataset_coco.json")


def shard_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


SMALL = SyntheticConfig(train_samples=30, samples_per_shard=16, zeroshot_classes=("colour",), zeroshot_per_class=2, retrieval_images=5)


def test_synthetic_set_is_deterministic_and_consistent(tmp_path):
    a = make_synthetic(tmp_path / "a", SMALL)
    b = make_synthetic(tmp_path / "b", SMALL)
    c = make_synthetic(tmp_path / "c", SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))
    assert a.train_urls.endswith("{000000..000001}.tar")
    shard = "train/000001.tar"
    assert shard_members(a.root / shard) == shard_members(b.root / shard)
    assert shard_members(a.root / shard) != shard_members(c.root / shard)
    members = shard_members(a.root / shard)
    assert len(members) == 14 * 3  # samples 16..29, as jpg + txt + json
    meta = json.loads(members["000000016.json"])
    assert meta["caption"] == members["000000016.txt"].decode()
    assert all(
        s["colour"] in meta["caption"] and ("shape" if s["generic"] else s["shape"]) in meta["caption"] for s in meta["scene"]["shapes"]
    )
    assert Image.open(io.BytesIO(members["000000016.jpg"])).size == (64, 64)

    zeroshot = ZeroShotSet(a.zeroshot, eval_transform(preprocess_config(64)))
    assert len(zeroshot.classnames) == 7 and len(zeroshot) == 14
    assert zeroshot.classnames[zeroshot[3][1]] == "cyan shape"
    assert zeroshot.templates[1]("red shape") == "a large red shape"  # the free attributes are averaged out
    retrieval = RetrievalSet(a.retrieval_captions, a.retrieval_images, eval_transform(preprocess_config(64)))
    assert len(retrieval) == 5 and len(retrieval.texts) == 10


def test_synthetic_set_is_cached_by_its_parameters(tmp_path):
    make_synthetic(tmp_path, SMALL)
    stamp = (tmp_path / "train" / "000000.tar").stat().st_mtime_ns
    make_synthetic(tmp_path, SMALL)  # same parameters: found, not rewritten
    assert (tmp_path / "train" / "000000.tar").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other parameters"):
        make_synthetic(tmp_path, SyntheticConfig(**{**SMALL.__dict__, "seed": 3}))


@pytest.mark.parametrize("older", ["sizes", "flat backgrounds"])
def test_a_set_drawn_with_another_scene_vocabulary_is_not_reused(tmp_path, monkeypatch, older):
    make_synthetic(tmp_path, SMALL)
    if older == "sizes":
        monkeypatch.setitem(synthetic.SIZES, "small", 0.1)
    else:
        monkeypatch.setattr(synthetic, "BACKGROUND_SHADING", 0)
    with pytest.raises(FileExistsError, match="scene vocabulary"):
        make_synthetic(tmp_path, SMALL)


@pytest.mark.parametrize("background", sorted(synthetic.BACKGROUNDS))
def test_backgrounds_are_their_colour_under_smooth_uneven_light(background):
    def draw(index: int) -> np.ndarray:
        rng = synthetic.scene_rng(0, "test", index)
        return np.asarray(synthetic.render(synthetic.Scene(background, ()), 32, rng)).astype(int)

    pixels = draw(0)
    assert np.ptp(pixels, axis=2).max() <= 1  # a gray: the light changes brightness, not hue
    brightness = pixels[..., 0] - synthetic.BACKGROUNDS[background][0]
    assert np.abs(brightness).max() <= 1.5 * synthetic.BACKGROUND_SHADING  # bicubic smoothing overshoots the grid a little
    assert np.ptp(brightness) >= 10  # uneven
    steps = np.abs(np.concatenate([np.diff(brightness, axis=0).ravel(), np.diff(brightness, axis=1).ravel()]))
    assert steps.max() <= 10  # smooth: no edge that could pass for a shape's
    assert not np.array_equal(pixels, draw(1))  # each image is lit its own way


def test_synthetic_colours_are_drawn_as_named(tmp_path):
    paths = make_synthetic(tmp_path, SMALL)
    for folder, name in zip(sorted(p for p in paths.zeroshot.iterdir() if p.is_dir()), ZeroShotSet(paths.zeroshot, lambda x: x).classnames):
        pixels = np.asarray(Image.open(next(folder.glob("*.jpg")))).reshape(-1, 3).astype(int)
        shape = pixels[np.ptp(pixels, axis=1) > 60]  # every background is a gray, every shape colour a saturated one
        mean = shape.mean(0)
        colour = name.split()[0]
        assert colour in folder.name
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
        assert nearest == colour


def _one_of_each_skip_reason(first: int) -> list[dict]:
    return [
        {"__key__": f"x{first}", "jpg": b"not an image at all", "txt": f"sample {first}"},  # corrupt_image
        {"__key__": f"x{first + 1}", "txt": f"sample {first + 1}"},  # no_image
        {"__key__": f"x{first + 2}", "png": png()},  # no_caption
        {"__key__": f"x{first + 3}", "png": png(), "txt": "   "},  # empty_caption
        {"__key__": f"x{first + 4}", "png": huge_png_header(5000, 5000), "txt": f"sample {first + 4}"},  # too_large
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skips_after_the_last_full_batch_are_counted_in_every_worker(tmp_path, num_workers):
    # Two shards of 6 good samples then one of each skip reason, and an epoch longer than the data: each
    # stream's last full batch (of 3) comes before its skips, and the stream ends after them.
    shards = [[numbered_sample(10 * s + i) for i in range(6)] + _one_of_each_skip_reason(100 * (s + 1)) for s in range(2)]
    urls = write_shards(tmp_path / "tail", [sample for shard in shards for sample in shard], per_shard=11)
    dm = datamodule(urls, train_num_samples=30, batch_size_per_device=3, num_workers=num_workers, max_image_pixels=1_000_000)
    delivered = [int(i) for batch in dm.train_loader() for i in dm.on_before_batch_transfer(batch, 0)["text"][:, 0]]
    assert sorted(delivered) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert dm.skip_counts() == {
        "no_image": 2,
        "no_caption": 2,
        "empty_caption": 2,
        "corrupt_image": 2,
        "too_large": 2,
        "bad_record": 0,
        "no_label": 0,
        "bad_shard": 0,
    }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_workers_closing_reports_raise_no_length_warning(eighty, num_workers):
    importlib.reload(known_warnings)  # pytest drops the filters that importing toklip installed at collection
    loader = datamodule(eighty, train_num_samples=80, num_workers=num_workers).train_loader()
    with warnings.catch_warnings(record=True) as caught:
        batches = list(loader)  # list() asks len(loader) first, as Lightning does
    assert len(batches) == len(loader) == 16
    assert [str(w.message) for w in caught] == []


def test_an_epoch_that_delivers_nothing_fails_with_the_reasons(tmp_path):
    samples = [{**numbered_sample(i), "png": b"garbage"} for i in range(8)] + [{"__key__": "n", "png": png()}]
    urls = write_shards(tmp_path / "corrupt", samples, per_shard=9)
    dm = datamodule(urls, train_num_samples=8, batch_size_per_device=2)
    with pytest.raises(
        DataQualityError,
        match=r"epoch 0 delivered no training batch of 2 samples \(no_caption=1, corrupt_image=8\); check the shards in '.*corrupt/\{0000..0000\}.tar'",
    ):
        list(dm.train_loader())


def test_an_epoch_that_bad_shards_cut_short_fails_and_one_short_of_samples_goes_on(tmp_path):
    urls = write_shards(tmp_path / "shards", [numbered_sample(i) for i in range(40)], per_shard=10)
    for i in (1, 2, 3):
        (tmp_path / "shards" / f"{i:04d}.tar").write_bytes(b"")  # failed downloads
    with pytest.raises(DataQualityError, match=r"epoch 0 delivered 2 of its 8 batches \(bad_shard=3; max_skip_fraction=0.1\)"):
        list(datamodule(urls, train_num_samples=40, batch_size_per_device=5).train_loader())
    assert len(list(datamodule(urls, train_num_samples=40, batch_size_per_device=5, max_skip_fraction=0.8).train_loader())) == 2
    whole = write_shards(tmp_path / "whole", [numbered_sample(i) for i in range(10)], per_shard=10)
    assert len(list(datamodule(whole, train_num_samples=40, batch_size_per_device=5).train_loader())) == 2  # no bad shard


@pytest.mark.parametrize("damage", ["corrupt", "empty"])
def test_resampled_shards_of_which_nothing_decodes_fail_instead_of_drawing_forever(tmp_path, damage):
    urls = write_shards(tmp_path / "bad", [{**numbered_sample(i), "png": b"garbage"} for i in range(4)], per_shard=2)
    if damage == "empty":
        for shard in (tmp_path / "bad").glob("*.tar"):
            shard.write_bytes(b"")
    found = "corrupt_image=" if damage == "corrupt" else "bad_shard=2"  # a shard counts once
    with pytest.raises(DataQualityError, match=rf"20 shards drawn and not one sample decoded \(.*{found}.*\); check the shards"):
        next(iter(datamodule(urls, train_num_samples=8, batch_size_per_device=2, resampled=True).train_loader()))


@pytest.mark.skipif(
    multiprocessing.get_start_method() != "fork", reason="its slowed init is patched into this process: only forked workers have it"
)
def test_loader_workers_leave_sigterm_to_the_main_process(eighty, monkeypatch):
    # A signal to the whole process group reaches the workers too; the main process stops at a step
    # boundary and checkpoints, which it cannot do if its workers died under it. The second worker starts
    # slowly: CI once signalled one that had not yet come to ignore SIGTERM, and lost it.
    starting = workers._init_worker
    monkeypatch.setattr(workers, "_init_worker", lambda worker_id: (time.sleep(worker_id), starting(worker_id)))
    loader = datamodule(eighty, train_num_samples=80, num_workers=2, batch_size_per_device=2).train_loader()
    others = set(multiprocessing.active_children())  # other tests' processes may still be winding down
    batches = iter(loader)
    first = next(batches)  # from the first worker, while the second is still starting
    pool = [child for child in multiprocessing.active_children() if child not in others]
    assert len(pool) == 2
    for worker in pool:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert len([first, *batches]) == len(loader)  # every batch still comes


def test_spawned_loader_workers_leave_sigterm_to_the_main_process():
    # A spawned worker takes seconds to start (a new interpreter imports torch), so a SIGTERM sent as soon
    # as the loader started it comes before it ignores the signal. In a fresh process: only the first
    # start of multiprocessing's resource tracker lifts the block, and an earlier test may have started it.
    script = (
        "import os, signal, torch, toklip.data.workers as w\n"
        "loader = w.SignalSafeLoader(torch.arange(64), batch_size=4, num_workers=2, multiprocessing_context='spawn')\n"
        "batches = iter(loader)\n"
        "for worker in batches._workers: os.kill(worker.pid, signal.SIGTERM)\n"
        "print(len(list(batches)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "16"), done.stderr[-2000:]


def test_a_sigterm_to_the_main_process_while_it_starts_workers_is_not_lost():
    received = []
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with workers._sigterm_blocked():
            assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            os.kill(os.getpid(), signal.SIGTERM)  # delivered at once if another thread lets it in
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread takes it again
        time.sleep(0.1)  # where another thread took it, this one runs the handler at its next check
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("pool", ["live", "lost"])
def test_a_process_with_signal_safe_workers_exits_at_once(pool):
    # Workers that ignore SIGTERM would hang multiprocessing's exit handler (it SIGTERMs and joins them)
    # unless they are stopped first: a live pool by its shutdown, workers of a pool lost without one
    # (as one collected in a reference cycle can be) by SIGKILL.
    script = (
        "import torch, toklip.data.workers as w\n"
        "loader = w.SignalSafeLoader(torch.arange(64), batch_size=4, num_workers=2, persistent_workers=True)\n"
        "batches = iter(loader); next(batches)\n" + ("w._live_pools.discard(batches)\n" if pool == "lost" else "")
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
