"""The miniature's generation stage (`toklip-demo-generation`): text-conditional generators over the
stage-2 VQ indices, one per input mode (`codes`, `codes+toklip`) and seed, each a plain toklip-train
run on a training cache of the scenes; then samples for held-out prompts, judged by the stage-1 teacher.

The prompts are the zero-shot classes ("a large blue shape on a black background"): no training
caption reads so (captions always say where a shape is). Each prompt gets `samples_per_prompt`
samples; the real images of the same prompts are the zero-shot set's.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import compose_config
from ..data.eval_sets import ZeroShotSet
from ..data.synthetic import BACKGROUNDS, COLOURS, SIZES
from ..data.transforms import eval_transform, preprocess_config
from ..generation import SamplingSettings, load_generator, prompt_embeddings, sample_images
from ..generation.evaluation import SampleScorer, teacher_forced_nll
from ..models.factory import load_toklip
from ..models.teacher import load_open_clip, open_clip_config, read_open_clip_state_dict
from ..models.text import get_text_tokenizer_for
from ..tasks import cache
from .pipeline import ARTIFACTS, find_demo_dir, record_run_config, spread, stage_config, stage_config_of, train_timed
from .report import write_generation_report

GENERATION_DIR = "generation"
METRICS = ("fd", "clip_score", "prompt_accuracy", "colour_accuracy", "size_accuracy", "background_accuracy", "nll")


def make_cache(demo: Path, cfg: DictConfig) -> Path:
    """The scenes' training cache, for the generators: whole images (one view, no crop), their VQ
    indices and their captions' embeddings, by the demo's own stage-2 tokenizer and text tower."""
    out = demo / GENERATION_DIR / "cache"
    overrides = [
        f"experiment={cfg.stages.toklip}", f"paths.output_dir={out.parent}", f"output={out}", f"seed={cfg.seed}",
        f"paths.data_dir={cfg.paths.data_dir}", f"teacher.checkpoint={demo / 'teacher' / ARTIFACTS['teacher']}",
        f"tokenizer.checkpoint={demo / 'vq' / ARTIFACTS['vq']}", "views=1", "+data.crop_scale=[1.0,1.0]", "dtype=float32",
        "batch_size=256", "num_workers=0", *cfg.stage_overrides,
    ]  # fmt: skip
    print(f"\n=== generation: the training cache of the scenes -> {out} ===", flush=True)
    cache(compose_config("cache", overrides))
    return out


def held_out_prompts(stage: DictConfig) -> tuple[ZeroShotSet, list[str]]:
    """The zero-shot set (images in [0, 1]) and one prompt a class, in its own template."""
    plain = eval_transform(preprocess_config(stage.resolution, mean=(0, 0, 0), std=(1, 1, 1)))
    dataset = ZeroShotSet(stage.eval.sets.zeroshot.root, plain)
    return dataset, [prompts[0] for prompts in dataset.prompts()]


class Judge:
    """The stage-1 teacher, judging samples of the held-out prompts: FD in its image embedding against
    the zero-shot set's real images, CLIP-score with its text tower, its zero-shot accuracy."""

    def __init__(self, demo: Path, stage: DictConfig, dataset: ZeroShotSet, prompts: list[str]) -> None:
        teacher = load_open_clip(stage.teacher.model, read_open_clip_state_dict(demo / "teacher" / ARTIFACTS["teacher"]))
        preprocess = preprocess_config(stage.resolution)  # the miniature's teacher reads the VQ's [-1, 1] input
        tokenizer = get_text_tokenizer_for(open_clip_config(stage.teacher.model)["text_cfg"])
        self.scorer = SampleScorer(teacher, tokenizer, stage.resolution, preprocess.mean, preprocess.std)
        self.dataset, self.prompts = dataset, prompts
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))  # each image read once
        self.real, self.real_labels = torch.stack(images), torch.tensor(labels)

    def scores(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """FD, CLIP-score, prompt accuracy, and the accuracy on each attribute a prompt names (the
        teacher's prediction has the prompt's colour, size, background: where a miss lies)."""
        predicted = self.scorer.zeroshot_predictions(images, self.dataset.classnames, self.dataset.templates)
        names = self.dataset.classnames
        by_attribute = {
            f"{attribute}_accuracy": statistics.fmean(attribute_of(names[p], vocabulary) == attribute_of(names[t], vocabulary)
                                                      for p, t in zip(predicted.tolist(), labels.tolist()))
            for attribute, vocabulary in PROMPT_ATTRIBUTES.items()
        }  # fmt: skip
        return {
            "fd": self.scorer.frechet_distance(self.real, images),
            "clip_score": float(self.scorer.clip_scores(images, [self.prompts[i] for i in labels]).mean()),
            "prompt_accuracy": float(predicted.eq(labels).float().mean()),
            **by_attribute,
        }


PROMPT_ATTRIBUTES = {"colour": COLOURS, "size": SIZES, "background": BACKGROUNDS}  # what the held-out prompts name


def attribute_of(classname: str, vocabulary: Iterable[str]) -> str | None:
    """The word of a class name ("large blue shape on a black background") that is a value of an attribute."""
    return next((word for word in classname.split() if word in vocabulary), None)


def run_generation(cfg: DictConfig) -> dict[str, Any]:
    """Both input modes x `cfg.generation.seeds`, scored and written into the demo's report.md."""
    options = cfg.generation
    demo = find_demo_dir(options.demo_dir, cfg.paths.log_dir)
    out = demo / GENERATION_DIR
    stage = stage_config_of(demo)
    start = time.perf_counter()
    cache_dir = make_cache(demo, cfg)
    seconds = {"cache": time.perf_counter() - start}
    dataset, prompts = held_out_prompts(stage)
    judge = Judge(demo, stage, dataset, prompts)
    toklip = load_toklip(demo / "toklip" / ARTIFACTS["toklip"])
    labels = torch.arange(len(prompts)).repeat_interleave(options.samples_per_prompt)
    prompt_features = prompt_embeddings(toklip, prompts)
    conditions = prompt_features[labels]
    preprocess = toklip.preprocess_cfg
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (preprocess.mean, preprocess.std))
    real_indices = toklip.tokenizer.encode((judge.real - mean) / std).indices  # the held-out images' tokens
    settings = SamplingSettings(**OmegaConf.to_container(options.sampling))
    runs, samples = [], {}
    for seed in options.seeds:
        for mode in options.modes:
            run_dir = out / mode.replace("+", "_") / f"seed{seed}"
            overrides = [
                f"model.toklip={demo / 'toklip' / ARTIFACTS['toklip']}", f"data.train_urls={cache_dir}/*.tar",
                f"model.input_mode={mode}", f"seed={seed}", "resume=latest", *options.overrides,
            ]  # fmt: skip
            stage_cfg = stage_config(options.experiment, run_dir, overrides)
            record_run_config(run_dir, stage_cfg)
            print(f"\n=== generation: toklip-train experiment={options.experiment} {' '.join(overrides)} ===", flush=True)
            metrics, trained = train_timed(stage_cfg)
            began = time.perf_counter()
            generator, _ = load_generator(run_dir / "generator.safetensors")
            _, images = sample_images(generator, toklip, conditions, settings, seed=seed)
            scores = judge.scores(images, labels)
            scores["nll"] = teacher_forced_nll(generator, toklip, real_indices, prompt_features[judge.real_labels])
            seconds_in_all = None if trained is None else trained + time.perf_counter() - began  # None: read back, never timed
            runs.append({"mode": mode, "seed": seed, **scores, "train_loss": metrics.get("train/loss"),
                         "train_seconds": trained, "seconds": seconds_in_all})  # fmt: skip
            samples.setdefault(mode, images)  # the first seed's, for the grids
            print(f"{mode} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    seconds["total"] = time.perf_counter() - start
    summary = summarise(runs, len(prompts)) | {"runs": runs, "seconds": seconds, "prompts": prompts}
    reference = judge.scores(judge.real, judge.real_labels)  # the real images of the prompts: the ceiling
    summary["real_images"] = reference | {"fd": 0.0, "nll": float("nan")}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_generation_report(demo, summary, samples, labels, prompts, options.grid_prompts)
    print(report.read_text().split("## Generation", 1)[1].split("![")[0])
    return summary


def summarise(runs: list[dict[str, Any]], classes: int) -> dict[str, Any]:
    """Per mode, the mean and spread of each score over seeds; per score, the paired difference
    codes+toklip - codes (same seed), its mean and spread."""

    modes = sorted({run["mode"] for run in runs})
    by_mode = {mode: {m: spread([r[m] for r in runs if r["mode"] == mode]) for m in METRICS} for mode in modes}
    for mode in modes:  # the seconds of the runs timed (a run read back without a recorded time has none)
        timed = [r["seconds"] for r in runs if r["mode"] == mode and r["seconds"] is not None]
        by_mode[mode]["seconds"] = spread(timed) if timed else None
    paired = {}
    if {"codes", "codes+toklip"} <= set(modes):
        per_seed = {(r["mode"], r["seed"]): r for r in runs}
        seeds = sorted({r["seed"] for r in runs})
        paired = {m: spread([per_seed["codes+toklip", s][m] - per_seed["codes", s][m] for s in seeds]) for m in METRICS}
    return {"classes": classes, "by_mode": by_mode, "difference": paired}
