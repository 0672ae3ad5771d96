"""Hydra configuration: every experiment composes, resolution moves a run, errors name the key,
and the console tools run from the shell (train, a sweep, eval, encode) and from Python."""

import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import hydra.errors
import hydra.utils
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf, open_dict
from PIL import Image

import toklip
from toklip.cli.train import main as toklip_train_main
from toklip.config import check_required
from toklip.models.factory import build_toklip_from
from toklip.models.presets import preset_from_config
from toklip.preflight import check_input_alignment, check_resumed_model, check_shards
from toklip.run_lock import exclusive
from toklip.training.callbacks import RunPreempted

FULL_SIZE = ["toklip_s_256", "toklip_l_384", "toklip_so400m_512"]


def composed(*overrides: str, config: str = "train", output_dir: Path | None = None):
    """A config as the library composes it, outside any Hydra app (the run directory given here)."""
    cfg = toklip.compose_config(config, overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "unused")
    return cfg


@pytest.mark.parametrize("experiment", ["tiny", *FULL_SIZE])
def test_every_experiment_composes_and_builds_on_meta(experiment):
    cfg = composed(f"experiment={experiment}")
    with torch.device("meta"):
        model = build_toklip_from(preset_from_config(cfg))
    size = cfg.resolution
    assert model.image_size == size == cfg.data.image_size
    patch = 8 if experiment == "tiny" else 16
    assert model.visual.trunk.num_tokens == (size // patch) ** 2
    OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("experiment, size, batch", [("toklip_s_256", 256, 16), ("toklip_l_384", 384, 32)])
def test_release_recipes_are_encoded_exactly(experiment, size, batch):
    cfg = composed(f"experiment={experiment}")
    assert cfg.data.batch_size_per_device == batch and cfg.data.train_num_samples == 10_968_539
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (
        1e-5,
        [0.9, 0.95],
        1e-6,
        0.1,
        782,
    )
    assert (cfg.trainer.max_epochs, cfg.trainer.precision, cfg.seed) == (32, "16-mixed", 0)
    assert cfg.teacher.model == f"ViT-SO400M-16-SigLIP2-{size}" and cfg.model.tokenizer.name == "llamagen_vq16"
    assert (cfg.loss.contrastive, cfg.loss.distill_weight, cfg.loss.token_distill_weight) == ("clip", 1000.0, 0.0)
    assert cfg.model.optim.lr == 1e-5 and cfg.model.teacher.model == cfg.teacher.model


def test_resolution_alone_moves_a_run():
    cfg = composed("experiment=toklip_s_256", "resolution=384")
    assert cfg.data.image_size == cfg.model.image_size == 384
    assert cfg.teacher.model == "ViT-SO400M-16-SigLIP2-384"
    with torch.device("meta"):
        model = build_toklip_from(preset_from_config(cfg))
    assert model.visual.trunk.num_tokens == 24 * 24


def refused_before_building(cfg, monkeypatch) -> str:
    """The message of the ConfigError that `toklip.train(cfg)` raises having built and generated nothing."""

    def built(*args, **kwargs):
        raise AssertionError("built or generated before the configuration was checked")

    monkeypatch.setattr("toklip.tasks.instantiate", built)
    monkeypatch.setattr("toklip.tasks.write_synthetic", built)
    with pytest.raises(toklip.config.ConfigError) as raised:
        toklip.train(cfg)
    return str(raised.value)


def test_required_keys_are_named_before_anything_is_built(tmp_path, monkeypatch):
    cfg = composed("experiment=toklip_s_256", output_dir=tmp_path)
    with pytest.raises(ValueError, match="data.train_urls, tokenizer.checkpoint"):
        check_required(cfg)
    check_required(cfg, in_groups=False)  # what every tool checks first: its own keys (train's are all in groups)
    assert refused_before_building(cfg, monkeypatch).startswith("required configuration keys are not set: data.train_urls, ")


def toklip_tool(tool: str, *overrides: str, cwd: Path, multirun: bool = False) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name(tool)
    args = [str(script), *(["-m"] if multirun else []), *overrides]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


SMALL_RUN = ("experiment=tiny", "data.synthetic.train_samples=256", "data.synthetic.samples_per_shard=64", "data.synthetic.retrieval_images=20",
             "data.synthetic.zeroshot_classes=[colour]", "data.synthetic.zeroshot_per_class=2", "trainer.max_steps=2",
             "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "data.batch_size_per_device=8")  # fmt: skip


def warnings_in(stderr: str) -> list[str]:
    """The lines of Python warnings (`path.py:line: message`)."""
    return re.findall(r"^.*\.py:\d+: .*$", stderr, flags=re.MULTILINE)


def test_unknown_option_lists_the_valid_ones(tmp_path):
    done = toklip_tool("toklip-train", "trainer=gpus", cwd=tmp_path)
    assert done.returncode != 0 and "Available options" in done.stderr and "ddp_cpu" in done.stderr


def _files_written(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Each file of a run -> (modification time, contents); aside: its log (Hydra appends to it) and its
    lock (it names the process holding the run directory)."""
    files = (path for path in run_dir.rglob("*") if path.is_file() and path.suffix != ".log" and path.name != ".lock")
    return {str(path.relative_to(run_dir)): (path.stat().st_mtime_ns, path.read_bytes()) for path in files}


def test_train_from_the_shell_then_resume_eval_and_encode(tiny_teacher_checkpoint, tmp_path):
    run = [*SMALL_RUN, f"teacher.checkpoint={tiny_teacher_checkpoint}", "run_name=first"]
    done = toklip_tool("toklip-train", *run, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not warnings_in(done.stderr)  # a run prints no warning it means to trigger
    run_dir = tmp_path / "runs" / "train" / "first"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train/loss", "val/zeroshot/top1", "val/retrieval/t2i_R@1"} <= set(metrics)
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

    resumed = toklip_tool("toklip-train", *run, "trainer.max_steps=3", "resume=latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not warnings_in(resumed.stderr)
    assert (
        "resuming from" in resumed.stdout + resumed.stderr
        and torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    )

    written = _files_written(run_dir)
    again = toklip_tool("toklip-train", *run, "trainer.max_steps=3", "resume=latest", cwd=tmp_path)
    assert again.returncode == 0 and "finished at" in again.stdout + again.stderr
    after = _files_written(run_dir)
    assert {path: after[path] for path in written} == written  # a finished run resumed again changes nothing it wrote
    assert all(path.startswith(".hydra/resumed-") for path in set(after) - set(written))  # it records its own start only

    evaluated = toklip_tool("toklip-eval", *SMALL_RUN, f"checkpoint={run_dir / 'toklip.safetensors'}", "run_name=ev", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "eval" / "ev" / "eval.json").read_text())["results"]
    assert set(results) == {"zeroshot/top1", "zeroshot/top5", *(f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))}
    assert "zeroshot/top1" in evaluated.stdout

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 64), (60 * i, 20, 200)).save(images / f"img{i}.png")
    encoded = toklip_tool(
        "toklip-encode",
        *SMALL_RUN,
        f"checkpoint={run_dir / 'toklip.safetensors'}",
        f"input={images}",
        "output=enc",
        "run_name=en",
        cwd=tmp_path,
    )
    assert encoded.returncode == 0, encoded.stderr[-3000:]
    assert "encoded 3 images" in encoded.stdout
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["000000.json", "000000.tar", "manifest.json"]  # no temporary left
    records = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "enc" / "000000.tar"), shardshuffle=False).decode()}
    model = toklip.load_toklip(run_dir / "toklip.safetensors")
    transform = toklip.data.eval_transform(model.preprocess_cfg)
    image = transform(Image.open(images / "img1.png")).unsqueeze(0)
    record = records["img1"]
    assert record["indices.npy"].shape == (8, 8) and record["indices.npy"].dtype == np.int16  # 1024 codes fit
    assert model.tokenizer.decode(torch.from_numpy(record["indices.npy"]).long()[None]).shape == (1, 3, 64, 64)
    assert np.allclose(record["tokens.npy"], model.token_features(image)[0].detach().half().numpy(), atol=1e-3)
    assert np.allclose(record["embedding.npy"], model.encode_image(image, normalize=True)[0].detach().numpy(), atol=1e-5)


def test_a_two_job_sweep_writes_one_directory_per_job(tiny_teacher_checkpoint, tmp_path):
    done = toklip_tool(
        "toklip-train",
        *SMALL_RUN,
        f"teacher.checkpoint={tiny_teacher_checkpoint}",
        "run_name=sweep",
        "optim.lr=1e-4,3e-4",
        multirun=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "runs" / "train" / "multirun_sweep"
    lrs = sorted(OmegaConf.load(sweep / str(job) / ".hydra" / "config.yaml").optim.lr for job in (0, 1))
    assert lrs == [1e-4, 3e-4]
    assert all((sweep / str(job) / "metrics.json").is_file() for job in (0, 1))


def test_programmatic_train_returns_the_final_metrics(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed(
        *SMALL_RUN, f"teacher.checkpoint={tiny_teacher_checkpoint}", "trainer.max_steps=1", "logger=csv", output_dir=tmp_path / "run"
    )
    metrics = toklip.train(cfg)
    assert metrics["train/loss"] > 0 and "val/zeroshot/top1" not in metrics  # validation comes at step 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_a_key_no_part_reads_is_an_error_not_a_no_op(tiny_teacher_checkpoint):
    # The settings groups' schemas are dataclasses: a key they lack fails composition ...
    with pytest.raises(hydra.errors.ConfigCompositionException, match="optim.lr_decay"):
        composed("experiment=tiny", "optim.lr_decay=0.5")
    # ... and a key forced in with `+`, in any group, fails when the module is built, named.
    run = ("experiment=tiny", f"teacher.checkpoint={tiny_teacher_checkpoint}")
    for group, key in (("tokenizer", "codebook_sise"), ("teacher", "pretrained"), ("loss", "distill_wieght"), ("optim", "lr_decay")):
        cfg = composed(*run, f"+{group}.{key}=1")
        with pytest.raises(hydra.errors.InstantiationException, match=rf"{group}: unknown key\(s\) {group}.{key}; it takes"):
            hydra.utils.instantiate(cfg.model, _convert_="all")


def test_presets_are_the_hydra_compositions_the_groups_use():
    assert {"tiny_32", "tiny_64", "toklip_s_256", "toklip_l_384", "toklip_so400m_512"} <= set(toklip.available_presets())
    parts = toklip.models.preset("toklip_l_384")
    cfg = composed("experiment=toklip_l_384")
    assert parts == preset_from_config(cfg)
    assert (parts.tokenizer, parts.backbone, parts.image_size, parts.teacher) == (
        "llamagen_vq16",
        "so400m",
        384,
        "ViT-SO400M-16-SigLIP2-384",
    )
    with pytest.raises(KeyError, match="unknown preset 'toklip_m_256'; available: tiny_32"):
        toklip.models.preset("toklip_m_256")


def test_a_sweep_job_returns_the_optimized_metric_not_the_loss(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed(*SMALL_RUN, f"teacher.checkpoint={tiny_teacher_checkpoint}", output_dir=tmp_path / "run")
    assert cfg.optimized_metric == "val/zeroshot/top1"
    returned = toklip_train_main(cfg)  # what Hydra's job runner calls, in a sweep as in a single run
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert returned == metrics["val/zeroshot/top1"] != metrics["train/loss"]
    with open_dict(cfg):
        cfg.optimized_metric = "val/nothing"
        cfg.paths.output_dir = str(tmp_path / "run2")
    with pytest.raises(KeyError, match="optimized_metric='val/nothing' is not among the run's validation metrics: val/retrieval"):
        toklip_train_main(cfg)


def test_an_unquoted_brace_pattern_is_named_with_the_quoting_to_use(monkeypatch):
    monkeypatch.setattr("sys.argv", ["toklip-train", "experiment=toklip_s_256", "data.train_urls=/data/cc12m/{00000..01242}.tar"])
    with pytest.raises(
        SystemExit, match=r"""'data.train_urls=/data/cc12m/\{00000..01242\}.tar'.* 'data.train_urls="/data/cc12m/\{00000..01242\}.tar"'$"""
    ):
        toklip_train_main()


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc': expected int"),
        ("data.batch_size_per_device=big", "data.batch_size_per_device='big': expected int"),
        ("data.batch_size_per_device=0", "data.batch_size_per_device=0: expected a value >= 1"),
        ("data.max_skip_fraction=1.5", "data.max_skip_fraction=1.5: expected a value in [0, 1]"),
        ("+trainer.max_stepz=3", "trainer.max_stepz: lightning.Trainer takes no such argument; it takes accelerator"),
        ("trainer.precision=17", "trainer.precision=17: expected 64 or 32 or 16 or 'transformer-engine'"),
        ("resolution=60", "resolution=60: expected a multiple of 8, the downsample factor of tokenizer llamagen_tiny (e.g. 56 or 64)"),
        ("+tokenizer.codebook_sise=12", "tokenizer: unknown key(s) tokenizer.codebook_sise; it takes name, checkpoint"),
        ("resume=nowhere.ckpt", "resume=nowhere.ckpt: no such checkpoint"),
    ],
)
def test_config_mistakes_are_named_before_anything_is_built_or_generated(override, message, tmp_path, monkeypatch):
    cfg = composed("experiment=tiny", "teacher.checkpoint=unused.safetensors", override, output_dir=tmp_path)
    assert refused_before_building(cfg, monkeypatch).startswith(message)


def test_shards_and_workers_are_checked_before_the_model_is_built(synthetic_set, tmp_path, monkeypatch):
    run = ("experiment=tiny", f'data.train_urls="{synthetic_set.train_urls}"')
    with pytest.raises(
        toklip.config.ConfigError, match=r"data.num_workers=9: 4 shard\(s\) of .* cannot feed 9 loader streams .* data.num_workers=4"
    ):
        check_shards(composed(*run, "data.num_workers=9"))
    with pytest.raises(toklip.config.ConfigError, match=r"data.train_urls='.*/none-\*.tar': no shard matches"):
        check_shards(composed("experiment=tiny", f"data.train_urls={tmp_path}/none-*.tar"))
    check_shards(composed(*run, "data.num_workers=4"))
    shards_only = ("~data.synthetic", "data.train_num_samples=256", "eval=none", "teacher.checkpoint=unused.safetensors")  # nothing to draw
    nine = composed(*run, *shards_only, "data.num_workers=9", output_dir=tmp_path)
    assert "cannot feed 9 loader streams" in refused_before_building(nine, monkeypatch)  # as train runs it


def test_resuming_a_checkpoint_of_another_model_names_both(tmp_path, monkeypatch):
    checkpoint = tmp_path / "tiny32.ckpt"
    torch.save({"toklip": {"preset": "tiny_32", "architecture": dataclasses.asdict(toklip.models.preset("tiny_32"))}}, checkpoint)
    with pytest.raises(
        toklip.config.ConfigError,
        match=r"this checkpoint is a tiny_32 model \(llamagen_tiny_f4, tiny, 32 px, text tiny\), the run is tiny_64 \(llamagen_tiny, tiny, 64 px",
    ):
        check_resumed_model(composed("experiment=tiny"), str(checkpoint))
    check_resumed_model(composed("experiment=demo_toklip"), str(checkpoint))  # the same model: fine
    resumed = composed("experiment=tiny", f"resume={checkpoint}", "teacher.checkpoint=unused.safetensors", output_dir=tmp_path)
    assert "this checkpoint is a tiny_32 model" in refused_before_building(resumed, monkeypatch)  # as train runs it


def test_a_user_error_is_one_line_without_a_traceback(tmp_path):
    done = toklip_tool("toklip-train", "experiment=tiny", "teacher.checkpoint=t.safetensors", "trainer.max_steps=abc", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "toklip-train: trainer.max_steps='abc': expected int"


def test_input_alignment_needs_the_teachers_patch_grid_to_be_the_token_grid():
    with pytest.raises(
        toklip.config.ConfigError,
        match=r"align_input=true: the teacher tiny_teacher_64 sees 8x8 patches, the tokenizer llamagen_tiny_f4 gives 16x16",
    ):
        check_input_alignment(composed("experiment=tiny", "tokenizer=tiny_f4", "model.align_input=true"))
    check_input_alignment(composed("experiment=demo_toklip"))  # the miniature's: 8x8 both


def test_a_preempted_run_says_so_keeps_its_step_and_resumes(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = (*SMALL_RUN, f"teacher.checkpoint={tiny_teacher_checkpoint}", "trainer.max_steps=4")
    signal_at_2 = ("+callbacks.sigterm._target_=test_training.SignalAtStep", "+callbacks.sigterm.step=2")
    starts = tmp_path / "starting_steps"
    run = (*run, "+callbacks.starts._target_=test_training.RecordStartingStep", f"+callbacks.starts.record={starts}")
    with pytest.raises(RunPreempted, match=r"stopped by a signal at step 2 before the run finished; .* resume=latest"):
        toklip.train(composed(*run, *signal_at_2, output_dir=tmp_path / "run"))
    assert not any(worker.is_alive() for worker in toklip.data.workers._workers)  # its loader workers are stopped, not orphaned
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "preempted-step00000002.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "run" / "toklip.safetensors").exists()  # an unfinished run exports nothing
    metrics = toklip.train(composed(*run, "resume=latest", output_dir=tmp_path / "run"))
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and "train/loss" in metrics and starts.read_text().split() == ["0", "2"]
    toklip.train(composed(*run, output_dir=tmp_path / "straight"))  # the same four steps without a stop
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(resumed["state_dict"], straight, rtol=0, atol=1e-6)  # steps 3 and 4 went on from step 2


def test_one_writer_per_run_directory_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from toklip.run_lock import exclusive\nwith exclusive(Path({str(tmp_path)!r}) / '.lock', what='x'):\n    print('held', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    refused = pytest.raises(toklip.config.ConfigError, match=rf"run directory {tmp_path} is in use by process {holder.pid} on")
    with refused, exclusive(tmp_path / ".lock", what=f"run directory {tmp_path}"):
        pass
    with refused:  # as train takes it
        toklip.train(composed(*SMALL_RUN, "teacher.checkpoint=unused.safetensors", output_dir=tmp_path))
    holder.kill()
    holder.wait()
    with exclusive(tmp_path / ".lock", what=f"run directory {tmp_path}"):  # the kill released it
        pass


def test_two_processes_drawing_one_synthetic_set_do_not_interleave(tmp_path, monkeypatch):
    # Two processes (a run's ranks, or two tools) ask for one set at the same moment. They are forks of this
    # process released together, each drawing slowed by 0.5 s: without the lock their drawings overlap for
    # certain (two fresh interpreters spend seconds on imports, and rarely met in the 0.1 s a drawing takes).
    args = ["train_samples=64", "samples_per_shard=32", "zeroshot_classes=[shape]", "zeroshot_per_class=1", "retrieval_images=4"]
    cfg = toklip.compose_config("make_synthetic", [f"out={tmp_path / 'syn'}", *args])
    fork = multiprocessing.get_context("fork")
    together, drawings = fork.Barrier(2), fork.Queue()
    draw = toklip.tasks.write_synthetic

    def slow_draw(root, config, **options):
        began = time.monotonic()
        time.sleep(0.5)
        paths = draw(root, config, **options)
        drawings.put((began, time.monotonic()))
        return paths

    monkeypatch.setattr("toklip.tasks.write_synthetic", slow_draw)
    processes = [fork.Process(target=lambda: (together.wait(), toklip.tasks.make_synthetic(cfg))) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0, 0]
    first, second = sorted(drawings.get(timeout=10) for _ in processes)
    assert first[1] <= second[0], (first, second)  # one drew while the other waited for the lock
    config = toklip.data.SyntheticConfig(
        train_samples=64, samples_per_shard=32, zeroshot_classes=("shape",), zeroshot_per_class=1, retrieval_images=4
    )
    paths = toklip.data.make_synthetic(tmp_path / "syn", config)  # finds the set whole, draws nothing again
    assert len(list(wds.WebDataset(paths.train_urls, shardshuffle=False))) == 64


def test_sigterm_to_the_process_group_stops_the_tool_at_a_step_with_a_checkpoint(tiny_teacher_checkpoint, tmp_path):
    run = [*SMALL_RUN, f"teacher.checkpoint={tiny_teacher_checkpoint}", "trainer.max_steps=6", "data.num_workers=1", "run_name=p"]
    signal_group = ["+callbacks.sigterm._target_=test_training.SignalAtStep", "+callbacks.sigterm.step=3", "+callbacks.sigterm.group=true"]
    script = Path(sys.executable).with_name("toklip-train")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # where the signalling callback lives
    done = subprocess.run(
        [str(script), *run, *signal_group], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("toklip-train: stopped by a signal at step 3 before the run finished")
    assert "DataLoader worker" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "runs" / "train" / "p" / "checkpoints" / "preempted-step00000003.ckpt").is_file()
