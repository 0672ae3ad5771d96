"""The run logic every tool calls: train, evaluate, encode, cache, generate, convert, make_synthetic (each `cfg -> result`).

A task takes a composed configuration (`toklip.config.compose_config`, or a tool's `@hydra.main`)
and builds everything from it; `toklip/cli/` only wraps these in Hydra mains and prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from .checkpoints import (
    CheckpointError,
    newest_readable_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    replace_file,
    verify_checksum,
)
from .comprehension import answer_questions, caption_scores, load_comprehension, question_accuracy, read_questions
from .comprehension.evaluation import image_loader
from .config import ConfigError, check_required
from .data.eval_sets import RetrievalSet, build_eval_sets, check_images_exist
from .data.synthetic import SyntheticConfig, SyntheticPaths
from .data.synthetic import make_synthetic as write_synthetic
from .data.transforms import TRAIN_CROP_SCALE, eval_transform, preprocess_config
from .data.workers import shut_down_worker_pools
from .encoding import CacheEncoder, FeatureEncoder, input_parts, run_encode_job
from .evaluation import evaluate as evaluate_model
from .generation import SamplingSettings, check_toklip_fits, load_generator, sample_images
from .generation.evaluation import SampleScorer, image_batches
from .generation.sampling import condition_tensor, save_samples
from .models.factory import build_toklip_from, convert_released, convert_teacher, load_toklip
from .models.presets import preset_from_config
from .models.text import get_text_tokenizer_for
from .models.toklip import TokLIP
from .preflight import check_cached_run, check_input_alignment, check_resolution, check_resumed_model, check_shards, check_targets
from .run_lock import exclusive, is_first_process
from .tokenizers.base import codebook_fingerprint
from .training import TokLIPModule
from .training.callbacks import RunPreempted

log = logging.getLogger(__name__)


# ---- train ----------------------------------------------------------------------------------------


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, fit, and return the final metrics (also written to metrics.json).
    The run directory has one writer: a second run started on it while the first lives is refused.
    A finished run resumed again builds and writes nothing and returns its recorded metrics."""
    check_cached_run(cfg)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("synthetic", None)  # the generator's parameters, for prepare_synthetic_data
    ckpt_path = preflight(cfg, data_cfg)
    run_dir = Path(cfg.paths.output_dir)
    with exclusive(run_dir / ".lock", what=f"run directory {run_dir}") if is_first_process() else contextlib.nullcontext():
        for directory in (run_dir, run_dir / "checkpoints"):
            for stale in remove_stale_temporaries(directory):
                log.info("removed %s, left by a writer that was killed", stale)
        finished = _finished_metrics(run_dir, ckpt_path, cfg.trainer)
        if finished is not None:
            log.info("%s finished at %s; nothing to do (its metrics: %s)", run_dir, ckpt_path, run_dir / METRICS_FILE)
            return finished
        return _fit(cfg, data_cfg, ckpt_path)


METRICS_FILE = "metrics.json"  # written when a run finishes: its presence marks a finished run


def _finished_metrics(run_dir: Path, ckpt_path: str | None, trainer_cfg: DictConfig) -> dict[str, float] | None:
    """The recorded metrics of a run that already finished at `ckpt_path`, or None if it has training left.

    Finished means what Lightning's fit loop means (max_steps or max_epochs reached), and a completed
    fit recorded its metrics; a re-run then builds nothing and writes nothing."""
    metrics_file = run_dir / METRICS_FILE
    if ckpt_path is None or not metrics_file.is_file():
        return None
    checkpoint = read_checkpoint(ckpt_path, source="resume", verify=False)  # memory-mapped: a quick look
    max_steps, max_epochs = trainer_cfg.get("max_steps", -1), trainer_cfg.get("max_epochs")
    epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed", 0)
    steps_done = max_steps not in (None, -1) and checkpoint["global_step"] >= max_steps
    epochs_done = max_epochs not in (None, -1) and epochs >= max_epochs
    return json.loads(metrics_file.read_text()) if steps_done or epochs_done else None


def _fit(cfg: DictConfig, data_cfg: dict[str, Any], ckpt_path: str | None) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    prepare_synthetic_data(cfg)
    check_shards(cfg)
    datamodule = instantiate(data_cfg, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    # No evaluation sets: no validation loop (Lightning would otherwise run, and warn about, an empty one).
    no_validation = {"limit_val_batches": 0} if not data_cfg.get("eval_sets") else {}
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger), _convert_="all", **no_validation)
    if ckpt_path is not None:  # a resumed run writes on into its own checkpoint directory, on purpose
        checkpoint_dir = re.escape(os.path.realpath(Path(ckpt_path).parent))
        warnings.filterwarnings("ignore", message=f"Checkpoint directory {checkpoint_dir} exists and is not empty", category=UserWarning)
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # a SystemExit(None): it would end the process with status 0, as if finished
        raise RunPreempted(
            f"stopped by a signal at step {trainer.global_step} before the run finished; its checkpoint is in "
            f"{cfg.paths.output_dir}/checkpoints (continue with resume=latest)"
        ) from None
    finally:
        shut_down_worker_pools()
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        replace_file(Path(cfg.paths.output_dir) / METRICS_FILE, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    return metrics


def preflight(cfg: DictConfig, data_cfg: dict[str, Any]) -> str | None:
    """Every check that can run before anything is built or generated; returns the checkpoint to resume."""
    check_required(cfg)
    built = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("model", "trainer", "logger", "callbacks")}
    check_targets({"data": data_cfg, **built})
    check_resolution(cfg)
    check_input_alignment(cfg)
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path is not None:
        check_resumed_model(cfg, ckpt_path)
    return ckpt_path


def optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a Hydra sweeper optimises: `cfg.optimized_metric` of the run's metrics (None when unset).

    A run that validated but has no such metric names it wrongly (an error); a run that did not
    validate since it (re)started has none to give (a warning, and None)."""
    name = cfg.get("optimized_metric")
    if name is None or name in metrics:
        return metrics.get(name)
    validated = sorted(key for key in metrics if key.startswith("val/"))
    if validated:
        raise KeyError(f"optimized_metric={name!r} is not among the run's validation metrics: {', '.join(validated)}")
    log.warning("optimized_metric=%s: the run did not validate since it (re)started, so a sweeper gets None", name)
    return None


def prepare_synthetic_data(cfg: DictConfig) -> None:
    """data=synthetic: write the scenes on first use (kept, and found again, for the same parameters)."""
    synthetic = cfg.data.get("synthetic")
    if synthetic is not None:
        options = OmegaConf.to_container(synthetic, resolve=True)
        try:
            _write_synthetic_locked(Path(options.pop("root")), options)
        except (FileExistsError, ValueError) as err:
            raise ConfigError(f"data.synthetic: {err}") from None


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """`resume`: null (start afresh), a path, or latest: the run directory's checkpoint of the highest
    step that reads back whole (step checkpoints, `last.ckpt` and SLURM's `hpc_ckpt_*` alike)."""
    if cfg.resume is None:
        return None
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint")
        verify_checksum(path, f"resume={cfg.resume}")  # a damaged file is named here, before anything is built
        return str(path)
    run_dir = Path(cfg.paths.output_dir)
    candidates = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    if not candidates:
        log.info("resume=latest: no checkpoint in %s yet; starting from the beginning", run_dir)
        return None
    try:
        newest = newest_readable_checkpoint(candidates)
    except CheckpointError as err:
        raise CheckpointError(f"resume=latest in {run_dir}: {err}") from None
    log.info("resuming from %s", newest)
    return str(newest)


# ---- evaluate and encode -----------------------------------------------------------------------------


def load_model(cfg: DictConfig) -> TokLIP:
    """`cfg.checkpoint`: a training checkpoint (frozen parts rebuilt from its recorded sources), a
    released file or an export (`load_toklip`); with none, the configured architecture at random init.
    A tokenizer the config gives by `_target_` is registered first, so that files naming it load."""
    parts = preset_from_config(cfg)
    if cfg.checkpoint is None:
        return build_toklip_from(parts, tokenizer_checkpoint=cfg.tokenizer.checkpoint)
    path = Path(cfg.checkpoint)
    if path.suffix == ".ckpt" and "toklip" in read_checkpoint(path, source="checkpoint"):
        return TokLIPModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).model
    return load_toklip(path, preset=cfg.released_preset)


def resolve_device(name: str) -> str:
    """`auto`: the GPU when there is one."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Zero-shot and retrieval scores of `load_model(cfg)` on `cfg.eval.sets`, also written to `cfg.out`."""
    sets_cfg = OmegaConf.to_container(cfg.eval.sets, resolve=True)  # names any required path left empty
    if not sets_cfg:
        raise ValueError("no evaluation sets: choose eval=synthetic, eval=imagenet_coco, or set eval.sets")
    prepare_synthetic_data(cfg)
    model = load_model(cfg)
    eval_sets = build_eval_sets(sets_cfg, eval_transform(model.preprocess_cfg))
    tokenizer = get_text_tokenizer_for(model.text_spec, cfg.text.tokenizer_path)
    results = evaluate_model(
        model, eval_sets, tokenizer, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=resolve_device(cfg.device)
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": cfg.checkpoint, "results": results}, indent=2) + "\n")
    return results


def encode(cfg: DictConfig) -> dict[str, int]:
    """VQ indices, per-token features and embeddings of every image of `cfg.input`, into `cfg.output`:
    one output file per input shard, resumable, over the ranks and precision of `cfg.trainer`."""
    L.seed_everything(cfg.seed, verbose=False)  # a random-init model is the same one in every run of the job
    encoder = FeatureEncoder(load_model(cfg), features=list(cfg.features), tokens_dtype=_dtype(cfg, "tokens_dtype"))
    settings = {
        "kind": "features", "model": _describe_file(cfg.checkpoint), "preset": cfg.preset, "resolution": encoder.model.image_size,
        "features": list(encoder.features), "tokens_dtype": cfg.tokens_dtype, "seed": cfg.seed,
    }  # fmt: skip
    return _run_job(cfg, encoder, encoder.prepare(), settings)


def cache(cfg: DictConfig) -> dict[str, int]:
    """The training cache of `cfg.input` (the training shards by default) into `cfg.output`: per sample,
    `cfg.views` augmented crops' VQ indices and teacher embeddings, and the caption's text embedding,
    computed by the run's own frozen networks (`TokLIPModule`). `toklip-train data=cache` trains from it."""
    prepare_synthetic_data(cfg)
    L.seed_everything(cfg.seed, verbose=False)  # a random-init VQ is the same one in every run of the job
    module_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    module: TokLIPModule = instantiate({**module_cfg, "inputs": "images"}, _convert_="all")
    encoder = CacheEncoder(
        module, views=cfg.views, teacher_tokens=cfg.teacher_tokens, dtype=_dtype(cfg, "dtype"), captions=cfg.captions, labels=cfg.labels
    )
    crop_scale = list(cfg.data.get("crop_scale") or TRAIN_CROP_SCALE)  # the training stream's augmentation
    settings = {
        "kind": "cache", "architecture": asdict(module.architecture), "preset": cfg.preset, "resolution": cfg.resolution,
        "tokenizer": _describe_file(module.tokenizer_cfg["checkpoint"]), "teacher": _describe_file(module.teacher_cfg["checkpoint"]),
        "teacher_sha256": module.teacher_sha256(),
        "codebook_sha256": codebook_fingerprint(module.model.tokenizer.codebook()), "views": cfg.views,
        "teacher_tokens": cfg.teacher_tokens, "dtype": cfg.dtype, "crop_scale": crop_scale, "seed": cfg.seed,
        "captions": cfg.captions, "labels": cfg.labels,
    }  # fmt: skip
    return _run_job(cfg, encoder, encoder.prepare(crop_scale, cfg.seed), settings)


def _run_job(cfg: DictConfig, encoder: L.LightningModule, prepare: Any, settings: dict[str, Any]) -> dict[str, int]:
    return run_encode_job(
        encoder, input_parts(cfg.input, cfg.samples_per_file), cfg.output, settings=settings, prepare=prepare, format=cfg.format,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, make_trainer=instantiate(cfg.trainer, _partial_=True, _convert_="all"),
        max_skip_fraction=cfg.max_skip_fraction,
    )  # fmt: skip


def _dtype(cfg: DictConfig, key: str) -> torch.dtype:
    dtype = getattr(torch, str(cfg[key]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{key}={cfg[key]!r}: expected a floating-point dtype such as float16, bfloat16 or float32")
    return dtype


def _describe_file(path: str | None) -> str | None:
    """A weights file as a manifest records it: its absolute path and size (None: random init)."""
    return None if path is None else f"{os.path.abspath(path)} ({os.path.getsize(path)} bytes)"


# ---- generate ---------------------------------------------------------------------------------------


def generate(cfg: DictConfig) -> dict[str, float]:
    """Samples of a generator export for `cfg.prompts` or `cfg.classes` into `cfg.out` (a PNG a sample,
    grid.png, samples.json), and their scores by the TokLIP model itself (also scores.json): CLIP-score
    with the prompts; with `score.reference`, FD against those images; with `score.classnames`,
    zero-shot accuracy on the classes' samples. What can be checked is checked before anything is drawn."""
    settings = SamplingSettings(**OmegaConf.to_container(cfg.sampling))
    _check_generate_inputs(cfg)
    generator, toklip_path = load_generator(cfg.checkpoint)
    toklip = load_toklip(cfg.toklip or toklip_path)
    check_toklip_fits(generator, toklip, cfg.checkpoint)
    try:
        conditions, names = condition_tensor(generator, toklip, list(cfg.prompts), list(cfg.classes), cfg.text.tokenizer_path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.score.classnames is not None and (named := len(_classnames(cfg))) != generator.num_classes:
        raise ConfigError(f"score.classnames={cfg.score.classnames} names {named} classes; the generator has {generator.num_classes}")
    per_condition, device = cfg.samples_per_condition, resolve_device(cfg.device)
    repeated = conditions.repeat_interleave(per_condition, dim=0).to(device)
    _, images = sample_images(generator.to(device), toklip.to(device), repeated, settings, seed=cfg.seed, batch_size=cfg.batch_size)
    out = Path(cfg.out)
    save_samples(out, images.cpu(), names, per_condition)
    scores = _score_samples(cfg, toklip, images, [name for name in names for _ in range(per_condition)], repeated.cpu(), device)
    (out / "scores.json").write_text(json.dumps({"checkpoint": cfg.checkpoint, "scores": scores}, indent=2) + "\n")
    return scores


def _check_generate_inputs(cfg: DictConfig) -> None:
    """The counts, the score inputs and the output folder, before a model loads: a typo must not cost the sampling."""
    for key in ("samples_per_condition", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r}: expected 1 or more")
    if cfg.score.reference is not None and not Path(cfg.score.reference).is_dir():
        raise ConfigError(f"score.reference={cfg.score.reference}: not a folder of images")
    if cfg.score.classnames is not None:
        if not cfg.classes:
            raise ConfigError("score.classnames scores samples of class ids: give classes=[...]")
        if not Path(cfg.score.classnames).is_file():
            raise ConfigError(f"score.classnames={cfg.score.classnames}: no such file")
    if (Path(cfg.out) / "samples.json").exists():
        raise ConfigError(f"out={cfg.out} holds an earlier run's samples (samples.json): choose another folder")


def _classnames(cfg: DictConfig) -> list[str]:
    return [line.strip() for line in Path(cfg.score.classnames).read_text().splitlines() if line.strip()]


def _score_samples(
    cfg: DictConfig, toklip: TokLIP, images: torch.Tensor, names: list[str], conditions: torch.Tensor, device: str
) -> dict[str, float]:
    """The scores of the samples, on the device that drew them."""
    preprocess = toklip.preprocess_cfg
    tokenizer = get_text_tokenizer_for(toklip.text_spec, cfg.text.tokenizer_path)
    scorer = SampleScorer(
        toklip, tokenizer, toklip.image_size, preprocess.mean, preprocess.std, inception_weights=cfg.score.inception_weights,
        device=device,
    )  # fmt: skip
    scores = {}
    if cfg.prompts:
        scores["clip_score"] = float(scorer.clip_scores(images, names).mean())
    if cfg.score.reference is not None:
        scores["fd"] = scorer.frechet_distance(image_batches(cfg.score.reference, toklip.image_size, cfg.batch_size), images)
    if cfg.score.classnames is not None:
        scores["zeroshot_accuracy"] = scorer.zeroshot_accuracy(images, conditions, _classnames(cfg), OPENAI_IMAGENET_TEMPLATES)
    return scores


# ---- ask -------------------------------------------------------------------------------------------


def ask(cfg: DictConfig) -> dict[str, Any]:
    """A comprehension export answers: `image` + `question` -> {"answer"}; `questions` (a question file)
    -> accuracy overall and per type (answers.jsonl, scores.json in `out`); `captions` (COCO-style)
    -> CIDEr of its captions (captions.jsonl, scores.json)."""
    given = [name for name in ("question", "questions", "captions") if cfg.get(name) is not None]
    if len(given) != 1:
        raise ConfigError("give one of question= (with image=), questions= or captions= (with image_folder=)")
    if given == ["question"] and (cfg.image is None or cfg.image_folder is not None):
        raise ConfigError("question= is about one image: give image=<path>, and no image_folder=")
    if given != ["question"] and (cfg.image_folder is None or cfg.image is not None):
        raise ConfigError(f"{given[0]}= names images relative to a folder: give image_folder=<path>, and no image=")
    questions = read_questions(cfg.questions) if given == ["questions"] else []
    images = [Path(cfg.image)] if given == ["question"] else [Path(cfg.image_folder) / q.image for q in questions]
    check_images_exist(images, f"questions={cfg.questions}" if questions else "image=")  # before the model loads
    model = load_comprehension(cfg.checkpoint, resolve_device(cfg.device))
    size, device = model.vision.image_size, next(model.projector.parameters()).device
    if given == ["question"]:
        image = image_loader(Path(cfg.image).parent, size)(Path(cfg.image).name)
        return {"answer": model.answer(image[None].to(device), [cfg.question], max_new_tokens=cfg.max_new_tokens)[0]}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if given == ["questions"]:
        answers = answer_questions(
            model, questions, image_loader(cfg.image_folder, size), batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
        )
        lines = [json.dumps({**asdict(q), "prediction": a}) for q, a in zip(questions, answers)]
        (out / "answers.jsonl").write_text("\n".join(lines) + "\n")
        scores = question_accuracy(questions, answers)
    else:
        captions = RetrievalSet(cfg.captions, cfg.image_folder, eval_transform(preprocess_config(size)))
        scores, generated = caption_scores(model, captions, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
        lines = [json.dumps({"filename": path.name, "caption": text}) for path, text in zip(captions.image_paths, generated)]
        (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (out / "scores.json").write_text(json.dumps({"checkpoint": cfg.checkpoint, "scores": scores}, indent=2) + "\n")
    return scores


# ---- convert and make_synthetic ------------------------------------------------------------------


def convert(cfg: DictConfig) -> Path:
    """A released TokLIP checkpoint (`what=released`) or open_clip teacher weights (`what=teacher`) -> safetensors.
    The output is a new .safetensors, never the file it converts (a released .pt would be written over)."""
    if cfg.what not in ("released", "teacher"):
        raise ConfigError(f"what={cfg.what!r}: choose released or teacher")
    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"out={cfg.out}: the export is safetensors; name it <name>.safetensors")
    if cfg.checkpoint is not None and out.resolve() == Path(cfg.checkpoint).resolve():
        raise ConfigError(f"out={cfg.out} is the checkpoint it converts: write it beside, under another name")
    if cfg.what == "released":
        if cfg.checkpoint is None:
            raise ConfigError("checkpoint= must name the released TokLIP file (e.g. TokLIP_S_256.pt)")
        return convert_released(cfg.checkpoint, cfg.released_preset, cfg.out)
    return convert_teacher(cfg.teacher_model, cfg.checkpoint, cfg.out)


def make_synthetic(cfg: DictConfig) -> SyntheticPaths:
    """The synthetic-scene shards and evaluation sets under `cfg.out`."""
    options = OmegaConf.to_container(cfg, resolve=True)
    out, overwrite = Path(options.pop("out")), options.pop("overwrite")
    return _write_synthetic_locked(out, options, overwrite=overwrite)


def _write_synthetic_locked(root: Path, options: dict[str, Any], *, overwrite: bool = False) -> SyntheticPaths:
    """One writer at a time (every rank of a run asks for the set): the others wait, then find it made."""
    with exclusive(root.with_name(f".{root.name}.lock"), what=f"synthetic set {root}", wait=True):
        return write_synthetic(root, SyntheticConfig.from_options(options), overwrite=overwrite)


def print_metrics(metrics: dict[str, Any]) -> None:
    """One `name  value` line a metric, sorted by name."""
    width = max((len(k) for k in metrics), default=0)
    for name in sorted(metrics):
        print(f"{name:<{width}}  {metrics[name]:.4f}")
