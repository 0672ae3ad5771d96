"""The miniature's comprehension stage (`toklip-demo-comprehension`): LLaVA-style models that read the
scenes through each visual input (`toklip`, `codes`, `teacher`), trained on questions read off the scene
grammar, scored on held-out images, at growing shares of the training questions and several seeds.

1. A question set (toklip/data/scene_questions.py): training images with six questions each, held-out
   images with theirs.
2. A tiny LM (a word-level tokenizer, a small Llama), pretrained on the text of the training
   conversations and captions alone, as LLaVA's LM knows its language before it sees an image.
3. Per input and seed: LLaVA's stage 1 (the projector learns to caption the demo's training shards for
   the frozen LM), then per share of the questions stage 2 (projector and LM learn to answer), each a
   plain toklip-train run; its export answers the held-out questions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..comprehension import load_comprehension, load_language_model, make_tiny_language_model, read_conversations, read_questions
from ..comprehension.conversation import IMAGE_PLACEHOLDER, PromptFormat
from ..comprehension.evaluation import answer_questions, image_loader, question_accuracy
from ..comprehension.language_model import load_tokenizer
from ..data.scene_questions import QUESTION_TYPES, QuestionSetConfig, write_question_set
from .pipeline import ARTIFACTS, find_demo_dir, record_run_config, spread, stage_config, stage_config_of, train_timed
from .report import write_comprehension_report

COMPREHENSION_DIR = "comprehension"
SCORES = ("accuracy", *(f"accuracy/{kind}" for kind in QUESTION_TYPES))


def input_overrides(kind: str, demo: Path, codes_width: int) -> list[str]:
    """The toklip-train overrides that make a visual input of the demo's stage-1..3 models."""
    return {
        "toklip": ["vision_input=toklip", f"vision_input.checkpoint={demo / 'toklip' / ARTIFACTS['toklip']}"],
        "codes": ["vision_input=codes", f"tokenizer.checkpoint={demo / 'vq' / ARTIFACTS['vq']}", f"vision_input.width={codes_width}"],
        "teacher": ["vision_input=teacher", f"teacher.checkpoint={demo / 'teacher' / ARTIFACTS['teacher']}"],
    }[kind]


def pretrain_language_model(directory: Path, texts: list[list[int]], steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Causal-LM training of the tiny LM on token sequences (text only), saved in place; the last loss."""
    model, tokenizer = load_language_model(directory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=generator).tolist()]
        longest = max(map(len, batch))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (longest - len(s)) for s in batch])
        labels = torch.tensor([s + [-100] * (longest - len(s)) for s in batch])
        loss = model(input_ids=ids, attention_mask=labels.ne(-100), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    return float(loss)


def make_language_model(out: Path, question_set: Path, options: DictConfig, seed: int) -> Path:
    """The tiny LM over the question set's words, pretrained on its conversations' text (kept, and found
    again, for the same settings)."""
    directory = out / "language_model"
    question_set_manifest = json.loads((question_set / "manifest.json").read_text())  # its words and texts are the set's
    settings = json.dumps(
        OmegaConf.to_container(options, resolve=True) | {"seed": seed, "question_set": question_set_manifest}, sort_keys=True
    )
    if (directory / "settings.json").is_file() and (directory / "settings.json").read_text() == settings:
        return directory
    conversations = read_conversations(question_set / "train.json") + read_conversations(question_set / "captions.json")
    texts = [f"{turn.question} {turn.answer}" for c in conversations for turn in c.turns]
    make_tiny_language_model(directory, texts, width=options.width, depth=options.depth, heads=options.heads, seed=seed)
    tokenizer = load_tokenizer(directory)
    prompt = PromptFormat()
    sequences = [[i for i in prompt.encode(tokenizer, c)[0] if i != IMAGE_PLACEHOLDER] for c in conversations]
    loss = pretrain_language_model(directory, sequences, options.pretrain_steps, options.batch_size, options.lr, seed)
    print(f"tiny LM: {len(sequences)} texts, {options.pretrain_steps} steps, last loss {loss:.3f}", flush=True)
    (directory / "settings.json").write_text(settings)
    return directory


def run_training(experiment: str, run_dir: Path, overrides: list[str]) -> tuple[dict[str, float], float | None]:
    """One toklip-train run (resumed, or only read back, when its directory holds it); its metrics and the
    seconds it trained (`train_timed`)."""
    stage_cfg = stage_config(experiment, run_dir, [*overrides, "resume=latest"])
    record_run_config(run_dir, stage_cfg)
    print(f"\n=== comprehension: toklip-train experiment={experiment} {' '.join(overrides)} ===", flush=True)
    return train_timed(stage_cfg)


def run_comprehension(cfg: DictConfig) -> dict[str, Any]:
    """Every input x seed x share of the questions, scored and written into the demo's report.md."""
    options = cfg.comprehension
    demo = find_demo_dir(options.demo_dir, cfg.paths.log_dir)
    out = demo / COMPREHENSION_DIR
    stage = stage_config_of(demo)
    start = time.perf_counter()
    question_set = write_question_set(out / "questions", QuestionSetConfig(**options.question_set, image_size=stage.resolution))
    language_model = make_language_model(out, question_set, options.language_model, cfg.seed)
    seconds = {"preparation": time.perf_counter() - start}
    questions = read_questions(question_set / "test.jsonl")
    load_image = image_loader(question_set / "images", stage.resolution)
    shards = [f"data.train_urls={stage.data.train_urls}", f"data.train_num_samples={stage.data.train_num_samples}"]
    common = [f"llm.path={language_model}", f"paths.data_dir={cfg.paths.data_dir}", *options.overrides]
    instruct_data = [f"data.conversations={question_set / 'train.json'}", f"data.image_folder={question_set / 'images'}"]
    runs = []
    for kind in options.inputs:
        visual = input_overrides(kind, demo, options.codes_width)
        for seed in options.seeds:
            align_dir = out / kind / f"seed{seed}" / "align"
            align = [*visual, *common, *shards, f"seed={seed}", *options.align_overrides]
            _, align_seconds = run_training(options.align_experiment, align_dir, align)
            for fraction in options.fractions:
                run_dir = out / kind / f"seed{seed}" / f"fraction{fraction}"
                overrides = [*visual, *common, *instruct_data, f"data.fraction={fraction}", f"seed={seed}",
                             f"model.init={align_dir / 'comprehension.safetensors'}", *options.instruct_overrides]  # fmt: skip
                metrics, trained = run_training(options.instruct_experiment, run_dir, overrides)
                began = time.perf_counter()
                model = load_comprehension(run_dir / "comprehension.safetensors")
                scores = question_accuracy(questions, answer_questions(model, questions, load_image, max_new_tokens=2))
                runs.append({"input": kind, "seed": seed, "fraction": fraction, **{s: scores.get(s) for s in SCORES},
                             "train_loss": metrics.get("train/loss"), "align_seconds": align_seconds, "train_seconds": trained,
                             "score_seconds": time.perf_counter() - began})  # fmt: skip
                print(
                    f"{kind} seed {seed} fraction {fraction}: " + ", ".join(f"{s} {scores[s]:.3f}" for s in SCORES if s in scores),
                    flush=True,
                )
    seconds["total"] = time.perf_counter() - start
    summary = summarise(runs) | {"runs": runs, "seconds": seconds, "questions": len(questions), "chance": chance_accuracy(questions)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_comprehension_report(demo, summary)
    print(report.read_text().split("## Comprehension", 1)[1].split("![")[0])
    return summary


def chance_accuracy(questions: list) -> dict[str, float]:
    """Per question type, the accuracy of always giving its most common held-out answer: what a blind model reaches."""
    by_type: dict[str, list[str]] = {}
    for question in questions:
        by_type.setdefault(question.type, []).append(question.answer)
    return {kind: max(answers.count(a) for a in set(answers)) / len(answers) for kind, answers in by_type.items()}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per input and share of the questions, the mean and spread of each score over seeds; and the paired
    differences (same seed, same share) toklip - codes and toklip - teacher."""
    inputs = list(dict.fromkeys(r["input"] for r in runs))
    fractions = sorted({r["fraction"] for r in runs})
    keyed = {(r["input"], r["seed"], r["fraction"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})

    def scores_of(kind: str, fraction: float) -> dict[str, dict[str, float]]:
        chosen = [r for r in runs if r["input"] == kind and r["fraction"] == fraction]
        return {s: spread([r[s] for r in chosen]) for s in SCORES if all(r[s] is not None for r in chosen)}

    def difference(other: str, fraction: float) -> dict[str, dict[str, float]]:
        return {
            s: spread([keyed["toklip", seed, fraction][s] - keyed[other, seed, fraction][s] for seed in seeds])
            for s in SCORES
            if all(keyed[k, seed, fraction][s] is not None for k in ("toklip", other) for seed in seeds)
        }

    by_input = {kind: {str(f): scores_of(kind, f) for f in fractions} for kind in inputs}
    differences = {
        f"toklip-{other}": {str(f): difference(other, f) for f in fractions}
        for other in ("codes", "teacher")
        if {"toklip", other} <= set(inputs)
    }
    return {"fractions": fractions, "seeds": seeds, "by_input": by_input, "differences": differences}
