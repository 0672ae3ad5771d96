"""The encode job (ranks x workers, resumable part by part, a manifest), the training cache, and training from it."""

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import open_dict

import toklip
from toklip.checkpoints import file_sha256
from toklip.config import ConfigError
from toklip.data import CacheDataModule
from toklip.data.transforms import train_transform, view_seed
from toklip.encoding import CacheEncoder, input_parts
from toklip.tasks import cache, encode
from toklip.training import TokLIPModule

TINY = ("experiment=tiny", "trainer.enable_progress_bar=false")


def tool(name: str, *overrides: str, cwd: Path, **options) -> subprocess.Popen:
    script = Path(sys.executable).with_name(name)
    return subprocess.Popen([str(script), *overrides], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def finished(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def keys_of(shards) -> list[str]:
    return [sample["__key__"] for shard in shards for sample in wds.WebDataset(str(shard), shardshuffle=False)]


def encode_cfg(tmp_path: Path, source, *overrides: str):
    cfg = toklip.compose_config("encode", [*TINY, f"input={source}", f"output={tmp_path / 'out'}", "num_workers=0", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


# ---- the encode job ---------------------------------------------------------------------------------


def test_two_ranks_with_two_workers_encode_disjoint_parts_whose_union_is_the_input(synthetic_set, tmp_path):
    shards = sorted(Path(synthetic_set.root, "train").glob("*.tar"))
    job = tool(
        "toklip-encode", *TINY, f"input={Path(synthetic_set.root, 'train')}/*.tar", "output=out", "trainer=ddp_cpu", "num_workers=2",
        "batch_size=16", "run_name=enc", cwd=tmp_path,
    )  # fmt: skip
    code, out, err = finished(job)
    assert code == 0, err[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    by_rank = {rank: {name for name, part in manifest["parts"].items() if part["rank"] == rank} for rank in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    # The manifest names one rank a part; what each rank says it encoded shows no part was encoded twice.
    assert sorted(int(n) for n in re.findall(r"encoded (\d+) images", out)) == [128, 128]
    assert by_rank[0] | by_rank[1] == {shard.stem for shard in shards} and manifest["complete"]
    assert sorted(keys_of(sorted((tmp_path / "out").glob("*.tar")))) == sorted(keys_of(shards))  # each image once
    assert manifest["samples"] == len(keys_of(shards)) and manifest["settings"]["kind"] == "features"


def test_a_rerun_redoes_only_the_missing_or_partial_parts(synthetic_set, tmp_path):
    source = f"{Path(synthetic_set.root, 'train')}/*.tar"
    counts = encode(encode_cfg(tmp_path, source))
    out = tmp_path / "out"
    assert counts["parts"] == 4 and counts["encoded"] == 256
    outputs = sorted(out.glob("*.tar"))
    first = {path.name: path.stat().st_mtime_ns for path in outputs}
    outputs[1].unlink()  # a part lost; another left half-written by a killed writer (a dead process's temporary)
    stale = out / f".{outputs[2].name}.tmp-999999999"
    stale.write_bytes(b"half a shard")
    counts = encode(encode_cfg(tmp_path, source))
    assert counts == {"parts": 1, "encoded": 64, "skipped": 0, "bad_shards": 0} and not stale.exists()
    assert {path.name: path.stat().st_mtime_ns for path in sorted(out.glob("*.tar")) if path.name != outputs[1].name} == {
        name: time for name, time in first.items() if name != outputs[1].name
    }
    assert sorted(keys_of(sorted(out.glob("*.tar")))) == sorted(keys_of(sorted(Path(synthetic_set.root, "train").glob("*.tar"))))
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert encode(encode_cfg(tmp_path, source)) == {}  # nothing left to do


def test_other_settings_over_the_same_output_are_refused_with_what_to_do(synthetic_set, tmp_path):
    source = f"{Path(synthetic_set.root, 'train')}/000000.tar"
    encode(encode_cfg(tmp_path, source))
    with pytest.raises(ConfigError, match=r"tokens_dtype: 'float16' there, 'float32' now.*choose another output, or delete"):
        encode(encode_cfg(tmp_path, source, "tokens_dtype=float32"))


def test_bf16_encodes_the_same_indices_as_fp32(synthetic_set, tmp_path):
    source = f"{Path(synthetic_set.root, 'train')}/000000.tar"
    for run, precision in (("fp32", "32-true"), ("bf16", "bf16-mixed")):  # the same seed: the same random-init model
        encode(encode_cfg(tmp_path / run, source, f"trainer.precision={precision}"))
    records = [
        {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / run / "out" / "000000.tar"), shardshuffle=False).decode()}
        for run in ("fp32", "bf16")
    ]
    assert all(np.array_equal(records[0][key]["indices.npy"], records[1][key]["indices.npy"]) for key in records[0])  # the fp32 path
    assert any(
        not np.array_equal(records[0][key]["tokens.npy"], records[1][key]["tokens.npy"]) for key in records[0]
    )  # the trunk ran in bf16


def test_skipped_images_and_damaged_shards_are_counted_and_named(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    good = wds.TarWriter(str(tmp_path / "in" / "a.tar"))
    from PIL import Image

    buffer = __import__("io").BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    good.write({"__key__": "ok", "png": buffer.getvalue()})
    good.write({"__key__": "broken", "png": b"not an image"})
    good.close()
    data = (tmp_path / "in" / "a.tar").read_bytes()
    (tmp_path / "in" / "b.tar").write_bytes(data[:700])  # truncated inside its first member
    counts = encode(encode_cfg(tmp_path, f"{tmp_path / 'in'}/*.tar"))
    assert counts == {"parts": 2, "encoded": 1, "skipped": 1, "bad_shards": 1}
    assert "skipped broken of" in caplog.text and "b.tar is truncated or unreadable" in caplog.text
    records = json.loads((tmp_path / "out" / "manifest.json").read_text())["parts"]
    assert records["a"]["skipped"] == {"corrupt_image": 1} and records["b"]["skipped"]["bad_shard"] == 1


def test_a_job_that_skips_too_many_images_fails_naming_why_and_keeps_its_parts(tmp_path, monkeypatch):
    from tests.test_data import png, write_shards
    from toklip.data import DataQualityError
    from toklip.encoding import job

    write_shards(tmp_path / "in", [{"__key__": f"{i}", "png": png() if i < 3 else b"not an image"} for i in range(8)], per_shard=4)
    source = f"{tmp_path / 'in'}/*.tar"
    assert encode(encode_cfg(tmp_path, source))["skipped"] == 5  # 8 images read: too few to judge the data by
    monkeypatch.setattr(job, "MIN_IMAGES_FOR_SKIP_CHECK", 8)
    (tmp_path / "out" / "0001.tar").unlink()  # redone: now judged
    with pytest.raises(DataQualityError, match=r"5 of 8 images skipped \(max_skip_fraction=0.5\): corrupt_image=5; the parts are in"):
        encode(encode_cfg(tmp_path, source, "max_skip_fraction=0.5"))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]  # nothing lost
    assert encode(encode_cfg(tmp_path, source, "max_skip_fraction=0.7")) == {}  # under the bound: finished, no error
    write_shards(tmp_path / "bad", [{"__key__": f"{i}", "png": b"not an image"} for i in range(2)], per_shard=2)
    with pytest.raises(DataQualityError, match="2 of 2 images skipped"):
        encode(encode_cfg(tmp_path / "b", f"{tmp_path / 'bad'}/*.tar"))  # nothing encoded: always an error
    with pytest.raises(ValueError, match="the input is empty"):
        input_parts("")  # not the working folder


def test_kill_9_at_a_random_moment_then_a_rerun_gives_every_sample_once(tmp_path):
    from tests.test_data import png, write_shards

    samples = [{"__key__": f"{i:05d}", "png": png((i % 255, 40, 90), size=(80, 64))} for i in range(240)]
    write_shards(tmp_path / "in", samples, per_shard=20)
    job = ("toklip-encode", *TINY, f"input={tmp_path / 'in'}/*.tar", "output=out", "batch_size=4", "num_workers=2", "run_name=kill")
    first = tool(*job, cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "out").glob("*.tar")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))  # somewhere in the job: between parts or inside one
    os.killpg(first.pid, signal.SIGKILL)  # the job and its loader workers, as a scheduler would
    first.communicate()
    done_before = len(list((tmp_path / "out").glob("*.tar")))
    assert done_before < 12, "the job finished before the kill: nothing was tested"
    code, out, err = finished(tool(*job, cwd=tmp_path))
    assert code == 0, err[-3000:]
    assert f"encoded {240 - 20 * done_before} images" in out
    outputs = sorted((tmp_path / "out").glob("*.tar"))
    assert len(outputs) == 12 and not list((tmp_path / "out").glob(".*tmp-*"))
    assert Counter(keys_of(outputs)) == Counter(sample["__key__"] for sample in samples)  # none twice, none missing
    for shard in outputs:  # every output reads whole
        assert all(record["indices.npy"].shape == (8, 8) for record in wds.WebDataset(str(shard), shardshuffle=False).decode())


def test_folders_are_cut_into_parts_with_their_captions(tmp_path):
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "photos" / "3.txt").write_text("a red square")
    parts = input_parts(tmp_path / "photos", files_per_part=2)
    assert [(p.name, p.files) for p in parts] == [("000000", ("0.png", "1.png")), ("000001", ("2.png", "3.png")), ("000002", ("4.png",))]
    assert [s.get("txt") for s in parts[1].samples()] == [None, b"a red square"]
    encode(encode_cfg(tmp_path, tmp_path / "photos", "samples_per_file=2"))
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "35.png")  # sorts between 3 and 4: the last part's files move
    counts = encode(encode_cfg(tmp_path, tmp_path / "photos", "samples_per_file=2"))
    assert counts["parts"] == 1 and counts["encoded"] == 2  # 000002 redone with 35 and 4; 000000 and 000001 kept
    assert sorted(keys_of(sorted((tmp_path / "out").glob("*.tar")))) == ["0", "1", "2", "3", "35", "4"]


def test_an_output_that_is_no_encodings_or_another_inputs_is_refused_untouched(synthetic_set, tmp_path):
    shards = Path(synthetic_set.root, "train")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")  # e.g. the input folder itself, given as the output
    with pytest.raises(ConfigError, match=r"output=.*out holds 1 file\(s\) \(e.g. notes.txt\) and no manifest.json"):
        encode(encode_cfg(tmp_path, f"{shards}/000000.tar"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    (tmp_path / "out" / "notes.txt").unlink()
    encode(encode_cfg(tmp_path, f"{shards}/000000.tar"))
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    other = tmp_path / "other"  # another data set with a shard of the same name
    other.mkdir()
    (other / "000000.tar").write_bytes((shards / "000001.tar").read_bytes())
    with pytest.raises(ConfigError, match=r"holds part 000000 encoded from .*train/000000.tar, not from .*other/000000.tar"):
        encode(encode_cfg(tmp_path, f"{other}/000000.tar"))
    with pytest.raises(ConfigError, match=r"part 000000's output would overwrite its own input"):
        encode(encode_cfg(tmp_path, f"{tmp_path / 'out'}/000000.tar"))  # an encoding encoded into itself
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == written


def test_an_unreadable_folder_image_is_a_counted_skip_and_keys_stay_readable(tmp_path, caplog):
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("0.png", "1.png", "IMG_2.edited.png", "sub/3.png"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(photos / name)
    (photos / "1b.png").symlink_to(photos / "gone.png")  # a broken link between readable images
    counts = encode(encode_cfg(tmp_path, photos))
    assert counts == {"parts": 1, "encoded": 4, "skipped": 1, "bad_shards": 0}  # the images after it were not lost
    assert "cannot read" in caplog.text and "1b.png" in caplog.text
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["parts"]["000000"]["skipped"] == {"no_image": 1}
    records = list(wds.WebDataset(str(tmp_path / "out" / "000000.tar"), shardshuffle=False))
    assert sorted(r["__key__"] for r in records) == ["0", "1", "IMG_2_edited", "sub/3"]  # a dot would end the key early
    assert all("indices.npy" in r for r in records)
    Image.new("RGB", (64, 64)).save(photos / "0.jpg")
    with pytest.raises(ValueError, match=r"1 key\(s\) under .*photos name more than one image, e.g. 0.jpg and 0.png"):
        input_parts(photos)


# ---- the training cache ---------------------------------------------------------------------------------


def live_module(frozen_parts, **options) -> TokLIPModule:
    teacher, vq, _ = frozen_parts
    torch.manual_seed(0)
    optim = {"lr": 1e-3, "warmup_steps": 2, "total_steps": 100}
    return TokLIPModule("tiny_64", tokenizer={"checkpoint": str(vq)}, teacher={"checkpoint": str(teacher)}, optim=optim, **options)


@pytest.mark.parametrize("token_distill_weight", [0.0, 10.0])
def test_a_cached_step_equals_the_live_step_on_the_same_crop(frozen_parts, synthetic_set, token_distill_weight):
    live = live_module(frozen_parts, loss={"token_distill_weight": token_distill_weight})
    cached = live_module(frozen_parts, loss={"token_distill_weight": token_distill_weight}, inputs="cache")
    cached.model.load_state_dict(live.model.state_dict(), strict=False)  # the same student
    assert not hasattr(cached.model.tokenizer, "encoder") and cached.model.text is None and cached.teacher is None
    wants_tokens = token_distill_weight > 0
    encoder = CacheEncoder(live, views=3, teacher_tokens=wants_tokens, dtype=torch.float32)
    prepare = encoder.prepare((0.5, 1.0), seed=0)  # crops that differ from view to view
    raw = list(wds.WebDataset(f"{synthetic_set.root}/train/000000.tar", shardshuffle=False))[:6]
    prepared = [prepare(sample) for sample in raw]
    inputs = {name: torch.stack([p[name] for p in prepared]) for name in ("image", "text")}
    stored = encoder.predict_step({"inputs": inputs})
    assert stored["indices"].dtype == torch.int16 and stored["indices"].shape == (6, 3, 8, 8)
    view = torch.tensor([0, 2, 1, 1, 0, 2])
    rows = torch.arange(6)
    live_losses = live.compute_losses({"image": inputs["image"][rows, view], "text": inputs["text"]})
    cached_batch = {
        "indices": stored["indices"][rows, view].long(),
        "teacher_features": stored["teacher_features"][rows, view],
        "text_features": stored["text_features"],
        **({"teacher_tokens": stored["teacher_tokens"][rows, view]} if wants_tokens else {}),
    }
    cached_losses = cached.compute_losses(cached_batch)
    assert live_losses.keys() == cached_losses.keys() == {"contrastive", "distill", *(["token_distill"] if wants_tokens else [])}
    for name in live_losses:  # to fp32 rounding: the cache's teacher ran on a batch of other size than the live step's
        torch.testing.assert_close(cached_losses[name], live_losses[name], rtol=1e-6, atol=0, msg=name)
    assert not torch.equal(stored["indices"][:, 0], stored["indices"][:, 1])  # the views are other crops


def test_views_are_the_same_crops_in_every_run(frozen_parts, synthetic_set):
    raw = next(iter(wds.WebDataset(f"{synthetic_set.root}/train/000001.tar", shardshuffle=False)))
    transform = train_transform(toklip.data.preprocess_config(64), (0.3, 1.0))
    from toklip.encoding.encoders import PrepareViews

    first = PrepareViews(transform, lambda texts: torch.zeros(1, 4), views=4, seed=7)(raw)
    torch.manual_seed(999)  # the global generator does not matter
    again = PrepareViews(transform, lambda texts: torch.zeros(1, 4), views=4, seed=7)(raw)
    assert torch.equal(first["image"], again["image"]) and not torch.equal(first["image"][0], first["image"][1])
    assert view_seed(7, "000000016", 0) == 4133497814074261089  # a value of record: no per-process salt (str hash) goes in


def cache_cfg(frozen_parts, data_dir: Path, out: Path, *overrides: str):
    cfg = toklip.compose_config(
        "cache",
        [*TINY, *frozen_parts[2], f"paths.data_dir={data_dir}", "data.synthetic.train_samples=128", "data.synthetic.samples_per_shard=32",
         "data.synthetic.retrieval_images=10", "data.synthetic.zeroshot_classes=[colour]", f"output={out}", "views=2", "num_workers=0",
         "batch_size=16", *overrides],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(out.parent / "cache_run")
    return cfg


def train_from_cache_cfg(frozen_parts, cache_dir: Path, run_dir: Path, *overrides: str):
    cfg = toklip.compose_config(
        "train",
        [*TINY, *frozen_parts[2], "data=cache", f"data.train_urls={cache_dir}/*.tar", "eval=none", "data.num_workers=0",
         "data.batch_size_per_device=8", "trainer.max_steps=2", *overrides],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def tiny_cache(frozen_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    counts = cache(cache_cfg(frozen_parts, root / "data", root / "cache"))
    assert counts["encoded"] == 128
    return root / "cache"


def test_cache_then_train_then_export_loads_and_the_checkpoint_resumes_live(frozen_parts, tiny_cache, tmp_path):
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    assert manifest["settings"]["views"] == 2 and manifest["samples"] == 128 and manifest["complete"]
    record = next(iter(wds.WebDataset(str(tiny_cache / "000000.tar"), shardshuffle=False).decode()))
    assert record["indices.npy"].shape == (2, 8, 8) and record["teacher_features.npy"].dtype == np.float16
    metrics = toklip.train(train_from_cache_cfg(frozen_parts, tiny_cache, tmp_path / "run"))
    assert np.isfinite(metrics["train/loss"])
    exported = toklip.load_toklip(tmp_path / "run" / "toklip.safetensors")
    live_export = live_module(frozen_parts).export_contents()[0]
    assert set(exported.state_dict()) == set(live_export)  # the whole model, VQ and text tower included
    torch.testing.assert_close(exported.text.state_dict(), live_module(frozen_parts).model.text.state_dict())
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed_live = TokLIPModule.load_from_checkpoint(checkpoint, inputs="images", weights_only=True)
    assert torch.equal(resumed_live.model.visual.trunk.pos_embed, exported.visual.trunk.pos_embed)


def test_resuming_mid_epoch_from_the_cache_replays_nothing(tiny_cache):
    def make():
        return CacheDataModule(f"{tiny_cache}/*.tar", batch_size_per_device=8, num_workers=0, sample_shuffle=(20, 5))

    def fingerprints(batches):
        return [tuple(b["text_features"][:, 0].tolist()) + tuple(b["indices"].sum(dim=(1, 2)).tolist()) for b in batches]

    full = fingerprints(make().train_loader())
    first = make()
    head = []
    for batch in first.train_loader():
        head.append(first.on_before_batch_transfer(batch, 0))
        if len(head) == 5:
            break
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = [resumed.on_before_batch_transfer(b, 0) for b in resumed.train_loader()]
    assert len(full) == 16 and fingerprints(head) + fingerprints(tail) == full


def test_a_cache_record_that_does_not_read_is_a_counted_skip():
    from toklip.data.cache import CachedSample
    from toklip.data.samples import SkippedSample

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    indices, features = np.arange(2 * 4, dtype=np.int16).reshape(2, 2, 2), np.eye(2, 3, dtype=np.float16)
    tokens = np.broadcast_to(np.arange(2, dtype=np.float16)[:, None, None], (2, 4, 3))  # view v: all v
    record = {"indices.npy": npy(indices), "text_features.npy": npy(np.ones(3, np.float16)), "teacher_features.npy": npy(features),
              "teacher_tokens.npy": npy(tokens)}  # fmt: skip
    drawn = set()
    for seed in range(8):  # seed 0 draws view 0; some seed of these draws view 1
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            view = int(torch.randint(2, ()))
            torch.manual_seed(seed)
            sample = CachedSample(teacher_tokens=True)(record)
        drawn.add(view)
        assert sample["indices"].dtype == torch.int64 and sample["indices"].tolist() == indices[view].tolist()
        assert sample["teacher_features"].dtype == torch.float32 and sample["teacher_features"].tolist() == features[view].tolist()
        assert sample["teacher_tokens"].shape == (4, 3) and sample["teacher_tokens"].eq(view).all()  # every array from the same view
        assert sample["text_features"].shape == (3,)
    assert drawn == {0, 1}
    assert "teacher_tokens" not in CachedSample()(record)
    with pytest.raises(SkippedSample, match="bad_record: no teacher_features.npy"):
        CachedSample()({"__key__": "a", "indices.npy": b"", "text_features.npy": b""})
    with pytest.raises(SkippedSample, match="bad_record: ValueError"):
        CachedSample()({"__key__": "a", "indices.npy": b"garbage", "teacher_features.npy": b"", "text_features.npy": b""})


def test_each_epoch_picks_a_view_afresh(tiny_cache):
    dm = CacheDataModule(f"{tiny_cache}/000000.tar", batch_size_per_device=32, num_workers=0, sample_shuffle=(0, 0), shard_shuffle=(0, 0))
    epochs = []
    for epoch in range(2):
        dm._epoch.set(epoch)
        epochs.append(next(iter(dm.train_stream()))["indices"])
    assert not torch.equal(epochs[0], epochs[1])


def test_a_cache_refuses_another_model_or_evaluation_sets(frozen_parts, tiny_cache, tmp_path):
    dm = CacheDataModule(f"{tiny_cache}/*.tar")
    settings = dm.manifest["settings"]
    with pytest.raises(ConfigError, match="another codebook"):
        dm.check_model(settings["architecture"], "0" * 64, settings["teacher_sha256"])
    with pytest.raises(ConfigError, match="made for the model"):
        dm.check_model({**settings["architecture"], "image_size": 32}, settings["codebook_sha256"], settings["teacher_sha256"])
    # Its targets are one teacher file's embeddings (that file also starts the student and gives the text tower).
    assert settings["teacher_sha256"] == file_sha256(frozen_parts[0])
    with pytest.raises(ConfigError, match=r"made with another teacher \(.*\) than this run's teacher.checkpoint"):
        dm.check_model(settings["architecture"], settings["codebook_sha256"], "0" * 64)
    dm.check_model(settings["architecture"], settings["codebook_sha256"], settings["teacher_sha256"])  # its own: accepted
    with pytest.raises(ConfigError, match="eval=none"):
        CacheDataModule(f"{tiny_cache}/*.tar", eval_sets={"zeroshot": {"kind": "zeroshot", "root": "x"}})
    with pytest.raises(ConfigError, match="cannot validate on eval sets zeroshot, retrieval: add eval=none"):
        toklip.train(train_from_cache_cfg(frozen_parts, tiny_cache, tmp_path / "run", "eval=synthetic"))
    with pytest.raises(ValueError, match="needs tokenizer.checkpoint"):
        TokLIPModule("tiny_64", teacher={"checkpoint": str(frozen_parts[0])}, inputs="cache")
