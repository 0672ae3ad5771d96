"""The miniature's stages, each a plain toklip-train experiment, then one evaluation of all three."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoints import replace_file
from ..config import ConfigError, compose_config
from ..data.eval_sets import EvalSet, build_eval_sets
from ..data.transforms import eval_transform, preprocess_config
from ..evaluation import evaluate
from ..evaluation.reconstruction import reconstruction_scores
from ..models.factory import load_toklip
from ..models.teacher import load_open_clip, open_clip_config, read_open_clip_state_dict
from ..models.text import get_text_tokenizer_for
from ..tasks import METRICS_FILE, train
from ..tokenizers import build_tokenizer, register_configured_tokenizer
from ..training.callbacks import RunPreempted
from .report import write_report

log = logging.getLogger(__name__)

ARTIFACTS = {"teacher": "teacher.safetensors", "vq": "tokenizer.safetensors", "toklip": "toklip.safetensors"}


def stage_config(experiment: str, output_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The toklip-train configuration of one stage, written to its own directory."""
    return compose_config("train", [f"experiment={experiment}", f"paths.output_dir={output_dir}", *overrides])


def find_demo_dir(demo_dir: str, log_dir: str | Path) -> Path:
    """`demo_dir`: a toklip-demo output, or `latest`: the newest finished one under `<log_dir>/demo`."""
    if demo_dir != "latest":
        path = Path(demo_dir)
        if not (path / "results.json").is_file():
            raise ConfigError(f"demo_dir={demo_dir}: no finished toklip-demo output there (no results.json)")
        return path
    finished = sorted((p.parent for p in Path(log_dir, "demo").glob("*/results.json")), key=lambda p: p.stat().st_mtime)
    if not finished:
        raise ConfigError(f"demo_dir=latest: no finished toklip-demo output under {Path(log_dir, 'demo')}; run toklip-demo first")
    return finished[-1]


def stage_config_of(demo: Path) -> DictConfig:
    """The demo's stage-3 (TokLIP) configuration: its resolution, teacher and held-out sets."""
    path = demo / "toklip" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{demo} has no toklip/config.yaml: is it a toklip-demo output?")
    return OmegaConf.load(path)


def record_run_config(run_dir: Path, stage_cfg: DictConfig) -> None:
    """Write the run's config.yaml. A run resumes from its directory (a finished one is only sampled
    and scored again), so a directory left by other settings is refused rather than resumed."""
    path = run_dir / "config.yaml"
    if path.is_file() and OmegaConf.to_yaml(OmegaConf.load(path)) != OmegaConf.to_yaml(stage_cfg):
        raise ConfigError(f"{run_dir} holds a run with other settings; move it away (or run on another demo output) to run these")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(stage_cfg, path)


TRAIN_SECONDS_FILE = "train_seconds.json"  # beside a run's metrics.json: how long it trained, over all its calls


def train_timed(stage_cfg: DictConfig) -> tuple[dict[str, float], float | None]:
    """`train(stage_cfg)` and the seconds its training took, recorded in the run directory.

    A call stopped by a signal (`RunPreempted`) records its seconds too, and the call that resumes the
    run adds its own: a resumed run's time is that of all its calls. A run found finished is only read
    back: its seconds are the recorded ones (None if it finished without a record), not the moment the
    read-back took."""
    run_dir = Path(stage_cfg.paths.output_dir)
    record = run_dir / TRAIN_SECONDS_FILE
    recorded = json.loads(record.read_text())["seconds"] if record.is_file() else None
    if (run_dir / METRICS_FILE).is_file():  # written when a run finishes: nothing is left to train
        return train(stage_cfg), recorded

    def record_seconds() -> float:
        seconds = (recorded or 0.0) + time.perf_counter() - start
        replace_file(record, json.dumps({"seconds": seconds}).encode())
        return seconds

    start = time.perf_counter()
    try:
        metrics = train(stage_cfg)
    except RunPreempted:  # it resumes from its checkpoint, and the call that resumes it adds its own seconds
        record_seconds()
        raise
    return metrics, record_seconds()


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, count and range of a score over seeds."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "min": min(values), "max": max(values)}


def run_stages(cfg: DictConfig, out: Path) -> tuple[dict[str, dict[str, float]], dict[str, float], DictConfig]:
    common = [f"seed={cfg.seed}", f"paths.data_dir={cfg.paths.data_dir}", *cfg.stage_overrides]
    teacher = f"teacher.checkpoint={out / 'teacher' / ARTIFACTS['teacher']}"
    inputs = {"teacher": [], "vq": [teacher], "toklip": [teacher, f"tokenizer.checkpoint={out / 'vq' / ARTIFACTS['vq']}"]}
    metrics, seconds = {}, {}
    for role, experiment in cfg.stages.items():
        stage_cfg = stage_config(experiment, out / role, [*inputs[role], *common])
        (out / role).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(stage_cfg, out / role / "config.yaml")
        print(f"\n=== stage {role}: toklip-train experiment={experiment} ===", flush=True)
        start = time.perf_counter()
        metrics[role] = train(stage_cfg)
        seconds[role] = time.perf_counter() - start
    return metrics, seconds, stage_cfg


def held_out_sets(stage_cfg: DictConfig) -> dict[str, EvalSet]:
    transform = eval_transform(preprocess_config(stage_cfg.resolution))
    return build_eval_sets(OmegaConf.to_container(stage_cfg.eval.sets, resolve=True), transform)


def _images(eval_sets: dict[str, EvalSet], batch_size: int = 64):
    """Every held-out image, in batches."""
    for dataset in eval_sets.values():
        yield from torch.stack([dataset[i][0] for i in range(len(dataset))]).split(batch_size)


def evaluate_all(out: Path, stage_cfg: DictConfig) -> dict[str, Any]:
    eval_sets = held_out_sets(stage_cfg)
    teacher_name = stage_cfg.teacher.model
    tokenizer = get_text_tokenizer_for(open_clip_config(teacher_name)["text_cfg"])
    teacher = load_open_clip(teacher_name, read_open_clip_state_dict(out / "teacher" / ARTIFACTS["teacher"]))
    vq_name = register_configured_tokenizer(OmegaConf.to_container(stage_cfg.tokenizer, resolve=True))["name"]
    vq = build_tokenizer(vq_name, checkpoint=out / "vq" / ARTIFACTS["vq"])
    return {
        "classes": len(next(d for d in eval_sets.values() if hasattr(d, "classnames")).classnames),
        "teacher": evaluate(teacher, eval_sets, tokenizer, num_workers=0),
        "toklip": evaluate(load_toklip(out / "toklip" / ARTIFACTS["toklip"]), eval_sets, tokenizer, num_workers=0),
        "vq": reconstruction_scores(vq, _images(eval_sets)),
    }


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1 teacher, stage 2 VQ tokenizer, stage 3 TokLIP, then evaluation and report.md.

    `cfg` is a composed `demo` config (`toklip.config.compose_config("demo")`, or toklip-demo's);
    the stages are composed in the active Hydra context, or in one of toklip's own."""
    out = Path(cfg.paths.output_dir)
    start = time.perf_counter()
    metrics, seconds, last_cfg = run_stages(cfg, out)
    print("\n=== evaluation on the held-out synthetic sets ===", flush=True)
    results = evaluate_all(out, last_cfg)
    seconds["total"] = time.perf_counter() - start
    report = write_report(out, results, seconds, cfg.report_images)
    summary = {k: v for k, v in results.items() if k != "vq"} | {
        "vq": {k: v for k, v in results["vq"].items() if k != "examples"},
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report.read_text().split("## Plots")[0])
    return summary
