"""A reduced miniature (few steps, few samples) runs end to end: three stages, evaluation, report, then
the generation and comprehension stages on its output."""

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

import toklip
from toklip.config import ConfigError
from toklip.evaluation import evaluate
from toklip.generation import load_generator
from toklip.miniature import pipeline, run_demo
from toklip.miniature.comprehension import SCORES, run_comprehension, summarise
from toklip.miniature.generation import METRICS, run_generation
from toklip.miniature.generation import summarise as summarise_generation
from toklip.miniature.report import comprehension_rows, generation_rows, target_table
from toklip.models.teacher import Teacher, open_clip_config, read_open_clip_state_dict
from toklip.models.text import get_text_tokenizer_for
from toklip.training.callbacks import RunPreempted

REDUCED = [
    "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.batch_size_per_device=8",
    "data.synthetic.train_samples=128", "data.synthetic.samples_per_shard=64", "data.synthetic.zeroshot_per_class=1",
    "data.synthetic.retrieval_images=16", "optim.warmup_steps=1",
]  # fmt: skip


def test_reduced_miniature_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Outside any Hydra app: the library composes the stages' configs itself.
    stage_overrides = ",".join(f"'{o}'" for o in REDUCED)
    cfg = toklip.compose_config(
        "demo", [f"stage_overrides=[{stage_overrides}]", "report_images=4", "seed=7", f"paths.data_dir={tmp_path / 'scenes'}"]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "demo")
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    teacher = Teacher("tiny_teacher_32", read_open_clip_state_dict(out / "teacher" / "teacher.safetensors"))
    tokenizer = toklip.build_tokenizer("llamagen_tiny_f4", checkpoint=out / "vq" / "tokenizer.safetensors")
    model = toklip.load_toklip(out / "toklip" / "toklip.safetensors")
    # TokLIP's frozen text tower is the teacher's, and its tokenizer is stage 2's.
    assert all(model.tokenizer.state_dict()[k].equal(v) for k, v in tokenizer.state_dict().items())
    assert teacher.image_size == (32, 32) and model.tokenizer.downsample == 4
    report = (out / "report.md").read_text()
    assert "| teacher zero-shot top-1 |" in report and "VQ tokenizer: PSNR" in report
    assert all((out / name).is_file() for name in ("loss_curves.png", "scores.png", "reconstructions.png"))
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == 42 and set(results["teacher"]) == set(results["toklip"])
    assert 0 < results["vq"]["codebook_usage"] <= 1 and results["vq"]["psnr"] > 0
    assert summary["seconds"]["total"] > 0
    # The TokLIP row is TokLIP's own scores, and the report shows the results it was written from.
    stage3_cfg = OmegaConf.load(out / "toklip" / "config.yaml")
    tokenizer_of_text = get_text_tokenizer_for(open_clip_config(stage3_cfg.teacher.model)["text_cfg"])
    assert results["toklip"] == evaluate(model, pipeline.held_out_sets(stage3_cfg), tokenizer_of_text, num_workers=0)
    for role in ("teacher", "toklip"):
        cells = next(line for line in report.splitlines() if line.startswith(f"| {role} | ")).split(" | ")[1:]
        assert cells[:2] == [f"{results[role]['zeroshot/top1']:.3f}", f"{results[role]['zeroshot/top5']:.3f}"]
    assert f"| TokLIP zero-shot top-1 | {results['toklip']['zeroshot/top1']:.1%} (" in report
    stage3 = json.loads((out / "toklip" / "metrics.json").read_text())
    assert 0 < stage3["train/input_alignment_r2"] <= 1  # demo_toklip warm-starts the token embedding
    # The VQ stage reads the stage-1 teacher as its perceptual network; every stage gets the demo's seed.
    vq_cfg = OmegaConf.load(out / "vq" / "config.yaml")
    assert vq_cfg.model.perceptual_teacher_checkpoint == str(out / "teacher" / "teacher.safetensors")
    assert json.loads((out / "vq" / "metrics.json").read_text())["train/loss_perceptual"] > 0
    stage_cfgs = [OmegaConf.load(out / role / "config.yaml") for role in ("teacher", "vq", "toklip")]
    assert {c.seed for c in stage_cfgs} == {7}
    # ... and the demo's data directory: the scenes are drawn once, where the user asked.
    assert {c.paths.data_dir for c in stage_cfgs} == {str(tmp_path / "scenes")}
    assert (tmp_path / "scenes" / "synthetic").is_dir() and not (tmp_path / "data").exists()

    # The generation stage on that output: both input modes, two seeds, a few steps each.
    def generation(steps: int) -> list[str]:
        return [
            f"stage_overrides=[{stage_overrides}]", "seed=7", f"paths.data_dir={tmp_path / 'scenes'}", f"generation.demo_dir={out}",
            "generation.seeds=[0,1]", "generation.samples_per_prompt=1", "generation.grid_prompts=2",
            f"generation.overrides=['trainer.max_steps={steps}','trainer.enable_progress_bar=false','data.batch_size_per_device=8']",
        ]  # fmt: skip

    summary = run_generation(toklip.compose_config("demo_generation", generation(steps=2)))
    assert [(r["mode"], r["seed"]) for r in summary["runs"]] == [("codes", 0), ("codes+toklip", 0), ("codes", 1), ("codes+toklip", 1)]
    assert all(r["fd"] > 0 and 0 <= r["prompt_accuracy"] <= 1 and 0 <= r["clip_score"] <= 100 for r in summary["runs"])
    assert summary["difference"]["fd"]["n"] == 2 and summary["classes"] == 42
    by_run = {(r["mode"], r["seed"]): r for r in summary["runs"]}
    for metric in METRICS:  # paired by seed: codes+toklip - codes
        gains = [by_run["codes+toklip", seed][metric] - by_run["codes", seed][metric] for seed in (0, 1)]
        assert summary["difference"][metric]["mean"] == pytest.approx(sum(gains) / 2)
    report = (out / "report.md").read_text()
    assert "| teacher zero-shot top-1 |" in report and report.count("## Generation") == 1
    assert "| codes+toklip − codes (paired by seed) |" in report and (out / "generation_samples.png").is_file()
    manifest = json.loads((out / "generation" / "cache" / "manifest.json").read_text())
    assert manifest["samples"] == 128 and manifest["settings"]["views"] == 1 and manifest["settings"]["crop_scale"] == [1.0, 1.0]
    generator, toklip_path = load_generator(out / "generation" / "codes_toklip" / "seed1" / "generator.safetensors")
    assert generator.input_mode == "codes+toklip" and generator.condition_kind == "text" and toklip_path.endswith("toklip.safetensors")
    # A run directory left by other settings is refused, not taken for this run's.
    with pytest.raises(ConfigError, match="holds a run with other settings"):
        run_generation(toklip.compose_config("demo_generation", generation(steps=3)))

    # The comprehension stage on that output: the three inputs, two seeds, two shares of the questions.
    comprehension = [
        f"stage_overrides=[{stage_overrides}]", "seed=7", f"paths.data_dir={tmp_path / 'scenes'}", f"comprehension.demo_dir={out}",
        "comprehension.seeds=[0,1]", "comprehension.fractions=[0.5,1.0]", "comprehension.question_set.train_images=32",
        "comprehension.question_set.test_images=6", "comprehension.language_model.pretrain_steps=3",
        "comprehension.overrides=['trainer.max_steps=2','trainer.enable_progress_bar=false','data.batch_size_per_device=4']",
        "comprehension.instruct_overrides=['trainer.max_steps=3']",
    ]  # fmt: skip
    summary = run_comprehension(toklip.compose_config("demo_comprehension", comprehension))
    runs = [(r["input"], r["seed"], r["fraction"]) for r in summary["runs"]]
    assert runs == [(i, s, f) for i in ("toklip", "codes", "teacher") for s in (0, 1) for f in (0.5, 1.0)]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["accuracy/background"] <= 1 for r in summary["runs"])
    assert summary["differences"]["toklip-codes"]["1.0"]["accuracy/colour"]["n"] == 2
    assert summary["questions"] == sum(1 for _ in (out / "comprehension" / "questions" / "test.jsonl").open())
    report = (out / "report.md").read_text()
    assert report.count("## Comprehension") == 1 and report.count("## Generation") == 1 and "| toklip − codes | 0.5 |" in report
    assert (out / "comprehension_efficiency.png").is_file()
    # Again, one input: its finished runs are read back, and keep the seconds they trained in the first call.
    again = run_comprehension(toklip.compose_config("demo_comprehension", [*comprehension, "comprehension.inputs=[codes]"]))
    first = [r for r in summary["runs"] if r["input"] == "codes"]
    seconds = ("align_seconds", "train_seconds")
    assert [[r[k] for k in seconds] for r in again["runs"]] == [[r[k] for k in seconds] for r in first]
    assert all(r["train_seconds"] > 0 for r in first)
    # The runs read the demo's own models: stage 1 aligned on the demo's shards, stage 2 began from it.
    instruct = OmegaConf.load(out / "comprehension" / "codes" / "seed1" / "fraction0.5" / "config.yaml")
    assert instruct.tokenizer.checkpoint == str(out / "vq" / "tokenizer.safetensors") and instruct.data.fraction == 0.5
    align = OmegaConf.load(out / "comprehension" / "codes" / "seed1" / "align" / "config.yaml")
    assert (instruct.trainer.max_steps, align.trainer.max_steps) == (3, 2)  # each stage's own overrides come last
    assert instruct.model.init == str(out / "comprehension" / "codes" / "seed1" / "align" / "comprehension.safetensors")


def test_comprehension_targets_are_judged_on_the_mean_and_show_each_seeds_range():
    """Background's toklip − codes per seed: +0.25, +0.20, +0.03. The mean (+0.16) meets the 0.15 line; the row
    must also say that one seed fell far below it."""
    codes_background = {0: 0.75, 1: 0.80, 2: 0.97}
    runs = [
        {"input": kind, "seed": seed, "fraction": 0.125, "align_seconds": 10.0, "train_seconds": 20.0, "score_seconds": 5.0}
        | dict.fromkeys(SCORES, 0.5)
        | {"accuracy/background": 1.0 if kind == "toklip" else codes_background[seed]}
        for kind in ("toklip", "codes")
        for seed in (0, 1, 2)
    ]
    rows = {what: (measured, met) for what, measured, _, met in comprehension_rows(summarise(runs) | {"runs": runs})}
    assert rows["background: toklip − codes, share 0.125"] == ("+0.160 ± 0.115 (seeds +0.030 to +0.250)", True)
    assert rows["colour: toklip − codes, share 0.125"] == ("+0.000 ± 0.000 (seeds +0.000 to +0.000)", False)
    assert rows["seconds, the inputs at share 0.125, one seed"] == ("70", True)  # two inputs x (10 + 20 + 5) s


def test_runs_read_back_without_a_recorded_time_are_left_out_of_the_time_targets_and_said_so():
    runs = [
        {"input": kind, "seed": seed, "fraction": 1.0, "align_seconds": 10.0, "train_seconds": 20.0 + seed, "score_seconds": 5.0}
        | dict.fromkeys(SCORES, 0.5)
        for kind in ("toklip", "codes")
        for seed in (0, 1)
    ]
    runs[3]["train_seconds"] = None  # codes, seed 1: finished before times were recorded
    rows = {what: (measured, met) for what, measured, _, met in comprehension_rows(summarise(runs) | {"runs": runs})}
    assert rows["seconds, the longest run"] == ("21 (1 read back untimed)", True)
    assert rows["seconds, the inputs at all the questions, one seed"] == ("70 (1 read back untimed)", True)  # seed 0 only
    for run in runs:
        run["align_seconds"] = run["train_seconds"] = None
    rows = {what: (measured, met) for what, measured, _, met in comprehension_rows(summarise(runs) | {"runs": runs})}
    assert rows["seconds, the longest run"] == ("not timed: every run was read back", None)
    table = target_table(comprehension_rows(summarise(runs) | {"runs": runs}))
    assert "| seconds, the longest run | not timed: every run was read back | <= 300 | not judged |" in table


def test_a_finished_run_read_back_gives_the_seconds_it_trained_not_those_of_the_read_back(tmp_path, monkeypatch):
    def train(cfg):  # finishes a run the first time (writes its metrics), only reads it back after
        metrics = Path(cfg.paths.output_dir, "metrics.json")
        if not metrics.is_file():
            time.sleep(0.05)
            metrics.write_text("{}")
        return {"train/loss": 1.0}

    monkeypatch.setattr(pipeline, "train", train)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    _, trained = pipeline.train_timed(cfg)
    assert trained >= 0.05
    assert pipeline.train_timed(cfg) == ({"train/loss": 1.0}, trained)
    (tmp_path / pipeline.TRAIN_SECONDS_FILE).unlink()  # a run finished before times were recorded
    assert pipeline.train_timed(cfg) == ({"train/loss": 1.0}, None)


def test_a_run_resumed_after_a_signal_is_timed_over_all_its_calls(tmp_path, monkeypatch):
    calls = []

    def train(cfg):  # stopped by a signal the first time, resumed and finished the second
        calls.append(cfg)
        time.sleep(0.1 if len(calls) == 1 else 0.05)
        if len(calls) == 1:
            raise RunPreempted("stopped by a signal at step 3")
        Path(cfg.paths.output_dir, "metrics.json").write_text("{}")
        return {"train/loss": 1.0}

    monkeypatch.setattr(pipeline, "train", train)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    with pytest.raises(RunPreempted):
        pipeline.train_timed(cfg)
    stopped = json.loads((tmp_path / pipeline.TRAIN_SECONDS_FILE).read_text())["seconds"]
    assert 0.1 <= stopped < 1.0
    _, trained = pipeline.train_timed(cfg)
    assert trained >= stopped + 0.05
    assert pipeline.train_timed(cfg) == ({"train/loss": 1.0}, trained)  # read back: the whole run's seconds


def test_the_generation_stage_times_only_the_runs_it_timed():
    runs = [
        {"mode": mode, "seed": seed, **dict.fromkeys(METRICS, 0.5), "seconds": None if seed else 90.0}
        for mode in ("codes", "codes+toklip")
        for seed in (0, 1)
    ]  # seed 1: read back, finished before times were recorded
    summary = summarise_generation(runs, classes=42) | {"runs": runs}
    assert summary["by_mode"]["codes"]["seconds"] == {"mean": 90.0, "std": 0.0, "n": 1, "min": 90.0, "max": 90.0}
    assert generation_rows(summary)[-1] == ("slowest run (train, sample, score)", "1.5 min (2 read back untimed)", "<= 5.0 min", True)
