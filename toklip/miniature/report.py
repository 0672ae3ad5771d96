"""report.md of the miniature: results against the targets, loss curves, scores, reconstructions."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data.scene_questions import QUESTION_TYPES

# The miniature's targets (issue #7): multiples of chance and of the teacher, decibels.
TEACHER_TIMES_CHANCE = 10.0
TOKLIP_TIMES_CHANCE = 5.0
TOKLIP_SHARE_OF_TEACHER = 0.75
MIN_PSNR_DB = 24.0


def _loss_curve(stage_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, train/loss) from the stage's CSV log."""
    files = sorted(stage_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        return [], []
    steps, losses = [], []
    with files[-1].open() as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
    return steps, losses


def _plots(out: Path, results: dict[str, Any], max_images: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, role in zip(axes, ("teacher", "vq", "toklip")):
        steps, losses = _loss_curve(out / role)
        ax.plot(steps, losses)
        ax.set(title=f"{role} training loss", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    files.append("loss_curves.png")

    names = ["zero-shot top-1", "image->text R@1", "text->image R@1"]
    keys = ["zeroshot/top1", "retrieval/i2t_R@1", "retrieval/t2i_R@1"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, model in ((-0.2, "teacher"), (0.2, "toklip")):
        ax.bar([i + offset for i in range(3)], [results[model][k] for k in keys], width=0.4, label=model)
    ax.axhline(1 / results["classes"], color="gray", linestyle="--", label="zero-shot chance")
    ax.set_xticks(range(3), names)
    ax.set(ylim=(0, 1), title="held-out synthetic sets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
    files.append("scores.png")

    images, reconstructions = results["vq"]["examples"]
    count = min(max_images, len(images))
    grid = torch.cat([images[:count], reconstructions[:count]]).clamp(-1, 1) * 0.5 + 0.5
    fig, axes = plt.subplots(2, count, figsize=(1.4 * count, 3))
    for i, ax in enumerate(axes.flat):
        ax.imshow(grid[i].permute(1, 2, 0).numpy())
        ax.axis("off")
    axes[0][0].set_title("images", loc="left")
    axes[1][0].set_title("VQ reconstructions", loc="left")
    fig.tight_layout()
    fig.savefig(out / "reconstructions.png", dpi=100)
    files.append("reconstructions.png")
    plt.close("all")
    return files


def target_rows(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) for each target of the miniature."""
    chance = 1 / results["classes"]
    teacher, toklip, vq = results["teacher"]["zeroshot/top1"], results["toklip"]["zeroshot/top1"], results["vq"]["psnr"]
    return [
        (
            "teacher zero-shot top-1",
            f"{teacher:.1%} ({teacher / chance:.1f}x chance)",
            f">= {TEACHER_TIMES_CHANCE:.0f}x chance",
            teacher >= TEACHER_TIMES_CHANCE * chance,
        ),
        (
            "TokLIP zero-shot top-1",
            f"{toklip:.1%} ({toklip / chance:.1f}x chance)",
            f">= {TOKLIP_TIMES_CHANCE:.0f}x chance",
            toklip >= TOKLIP_TIMES_CHANCE * chance,
        ),
        (
            "TokLIP / teacher",
            f"{toklip / max(teacher, 1e-9):.0%}",
            f">= {TOKLIP_SHARE_OF_TEACHER:.0%}",
            toklip >= TOKLIP_SHARE_OF_TEACHER * teacher,
        ),
        ("VQ reconstruction PSNR", f"{vq:.1f} dB", f">= {MIN_PSNR_DB:.0f} dB", vq >= MIN_PSNR_DB),
    ]


def target_table(rows: list[tuple[str, str, str, bool | None]], heading: str = "target") -> list[str]:
    """(target, measured, wanted, met) rows as a markdown table; met None: nothing measured to judge."""
    lines = [f"| {heading} | measured | wanted | met |", "|---|---|---|---|"]
    verdict = {True: "yes", False: "NO", None: "not judged"}
    return lines + [f"| {what} | {measured} | {wanted} | {verdict[met]} |" for what, measured, wanted, met in rows]


def time_row(
    what: str, seconds: list[float | None], limit: float, show: Callable[[float], str] = "{:.0f}".format
) -> tuple[str, str, str, bool | None]:
    """A time target judged on the longest of `seconds`. None is a time not known: a run read back that
    finished before times were recorded (or a seed with one). It is left out, and the row says so."""
    timed = [s for s in seconds if s is not None]
    if not timed:
        return what, "not timed: every run was read back", f"<= {show(limit)}", None
    untimed = len(seconds) - len(timed)
    measured = show(max(timed)) + (f" ({untimed} read back untimed)" if untimed else "")
    return what, measured, f"<= {show(limit)}", max(timed) <= limit


def spread_cell(score: dict[str, float] | None, digits: int = 3) -> str:
    """A score over seeds as "mean ± standard deviation" (empty where there is none)."""
    return "" if score is None else f"{score['mean']:.{digits}f} ± {score['std']:.{digits}f}"


def write_report(out: Path, results: dict[str, Any], seconds: dict[str, float], max_images: int = 8) -> Path:
    rows = target_table(target_rows(results))
    keys = ["zeroshot/top1", "zeroshot/top5", "retrieval/i2t_R@1", "retrieval/t2i_R@1", "retrieval/i2t_R@5", "retrieval/t2i_R@5"]
    scores = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    scores += [f"| {m} | " + " | ".join(f"{results[m][k]:.3f}" for k in keys) + " |" for m in ("teacher", "toklip")]
    vq = results["vq"]
    text = "\n".join([
        "# toklip CPU miniature", "",
        f"{results['classes']} zero-shot classes (chance {1 / results['classes']:.1%}); "
        f"time: teacher {seconds['teacher']:.0f} s, VQ {seconds['vq']:.0f} s, TokLIP {seconds['toklip']:.0f} s, "
        f"all {seconds['total']:.0f} s.", "",
        *rows, "", *scores, "",
        f"VQ tokenizer: PSNR {vq['psnr']:.2f} dB, codebook usage {vq['codebook_usage']:.1%} "
        f"(perplexity {vq['codebook_perplexity']:.0f} codes).", "",
        "## Plots", "",
        *(f"![{name}]({name})" for name in _plots(out, results, max_images)), "",
    ])  # fmt: skip
    path = out / "report.md"
    path.write_text(text)
    return path


# The generation stage's targets (issue #13).
PROMPT_ACCURACY_TIMES_CHANCE = 5.0
MAX_RUN_MINUTES = 5.0
GENERATION_SECTION = "## Generation"


def _sample_grid(path: Path, samples: dict[str, torch.Tensor], labels: torch.Tensor, prompts: list[str], rows: int) -> str:
    """Rows of prompts (spread over the classes), each mode's samples side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = torch.linspace(0, len(prompts) - 1, min(rows, len(prompts))).round().long().tolist()
    modes = list(samples)
    per_prompt = int((labels == 0).sum())
    fig, axes = plt.subplots(
        len(chosen), per_prompt * len(modes), figsize=(1.0 * per_prompt * len(modes), 1.1 * len(chosen)), squeeze=False
    )
    for row, prompt in enumerate(chosen):
        for m, mode in enumerate(modes):
            images = samples[mode][labels == prompt]
            for column in range(per_prompt):
                ax = axes[row][m * per_prompt + column]
                ax.imshow(images[column].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0 and column == 0:
                    ax.set_title(mode, loc="left", fontsize=9)
        axes[row][0].set_ylabel(prompts[prompt].removeprefix("a ").replace(" on a ", "\non a "), fontsize=6, rotation=0, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def generation_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met) for each target of the generation stage."""
    chance = 1 / summary["classes"]
    best = max(summary["by_mode"].items(), key=lambda item: item[1]["prompt_accuracy"]["mean"])
    accuracy = best[1]["prompt_accuracy"]["mean"]
    return [
        (
            f"teacher's accuracy on samples of the prompts (best mode: {best[0]})",
            f"{accuracy:.1%} ({accuracy / chance:.1f}x chance)",
            f">= {PROMPT_ACCURACY_TIMES_CHANCE:.0f}x chance",
            accuracy >= PROMPT_ACCURACY_TIMES_CHANCE * chance,
        ),
        time_row("slowest run (train, sample, score)", [run["seconds"] for run in summary["runs"]], 60 * MAX_RUN_MINUTES, _minutes),
    ]


def write_generation_report(
    out: Path, summary: dict[str, Any], samples: dict[str, torch.Tensor], labels: torch.Tensor, prompts: list[str], grid_prompts: int
) -> Path:
    """The generation section of `out/report.md` (replacing an earlier one), with its sample grid."""

    targets = target_table(generation_rows(summary))
    columns = {
        "fd": 3, "clip_score": 2, "prompt_accuracy": 3, "colour_accuracy": 3, "size_accuracy": 3, "background_accuracy": 3, "nll": 3,
    }  # fmt: skip
    table = [
        "| input | FD (teacher embedding) ↓ | CLIP-score ↑ | prompt accuracy ↑ | colour | size | background "
        "| held-out NLL ↓ | seconds a run |",
        "|---" * 9 + "|",
    ]
    for mode, scores in summary["by_mode"].items():
        cells = " | ".join(spread_cell(scores[name], digits) for name, digits in columns.items())
        seconds = "" if scores["seconds"] is None else f"{scores['seconds']['mean']:.0f}"
        table.append(f"| {mode} | {cells} | {seconds} |")
    if summary["difference"]:
        cells = " | ".join(spread_cell(summary["difference"][name], digits) for name, digits in columns.items())
        table.append(f"| codes+toklip − codes (paired by seed) | {cells} | |")
    real = summary["real_images"]
    table.append(
        "| real images of the prompts | "
        + " | ".join(f"{real[name]:.{digits}f}" for name, digits in columns.items() if name != "nll")
        + " | | |"
    )
    seeds = sorted({run["seed"] for run in summary["runs"]})
    grid = _sample_grid(out / "generation_samples.png", samples, labels, prompts, grid_prompts)
    section = "\n".join([
        GENERATION_SECTION, "",
        f"Text-conditional generators over the VQ indices, trained on the scenes' captions, sampled for the "
        f"{summary['classes']} held-out class prompts (\"{prompts[0]}\", ...; chance {1 / summary['classes']:.1%}); "
        f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}. Judged by the stage-1 teacher: FD in its image "
        f"embedding against the zero-shot set's real images, CLIP-score with its text tower, its zero-shot accuracy, "
        f"and how often its prediction has the prompt's colour, size and background; and the held-out NLL: the mean "
        f"negative log-likelihood (nats a token) of the real images' tokens under teacher forcing. "
        f"All {summary['seconds']['total']:.0f} s.", "",
        *targets, "", *table, "",
        f"![samples]({grid})", "",
    ])  # fmt: skip
    return replace_section(out / "report.md", GENERATION_SECTION, section)


def replace_section(path: Path, heading: str, section: str) -> Path:
    """Put `section` (which starts with its `## ` heading) into report.md, in place of an earlier one."""
    text = path.read_text() if path.is_file() else "# toklip CPU miniature\n"
    parts = text.split("\n## ")
    kept = [parts[0].rstrip(), *(f"## {part}".rstrip() for part in parts[1:] if not f"## {part}".startswith(heading))]
    path.write_text("\n\n".join([*kept, section.rstrip()]) + "\n")
    return path


COMPREHENSION_SECTION = "## Comprehension"
ATTRIBUTES_THE_TEACHER_KNOWS = ("colour", "size", "background")  # its zero-shot classes
MIN_GAIN_OVER_CODES = 0.15  # issue #14's targets: accuracy, at equal data
MAX_GAP_TO_TEACHER = 0.10
MAX_SECONDS = {"one run": 300.0, "all inputs": 600.0}  # a toklip-train run; stages 1 and 2 and scoring of every input


def comprehension_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, wanted, met) at the fewest and at all of the training questions."""
    bounds = {"toklip-codes": MIN_GAIN_OVER_CODES, "toklip-teacher": -MAX_GAP_TO_TEACHER}
    rows = []
    for fraction in sorted({min(summary["fractions"]), max(summary["fractions"])}):
        for kind in ATTRIBUTES_THE_TEACHER_KNOWS:
            for pair, bound in bounds.items():
                difference = summary["differences"].get(pair, {}).get(str(fraction), {}).get(f"accuracy/{kind}")
                if difference is not None:
                    what = f"{kind}: {pair.replace('-', ' − ')}, share {fraction:g}"
                    # The range beside the mean: a mean over a few seeds can clear the line on one or two of them.
                    low, high = difference["min"], difference["max"]
                    measured = f"{difference['mean']:+.3f} ± {difference['std']:.3f} (seeds {low:+.3f} to {high:+.3f})"
                    rows.append((what, measured, f">= {bound:+.2f}", difference["mean"] >= bound))
    runs, largest = summary["runs"], max(summary["fractions"])
    stages = [seconds for r in runs for seconds in (r["align_seconds"], r["train_seconds"])]
    rows.append(time_row("seconds, the longest run", stages, MAX_SECONDS["one run"]))

    def one_seed(seed: int) -> float | None:  # its inputs at the largest share: stages 1 and 2, then scoring
        parts = [
            t
            for r in runs
            if r["seed"] == seed and r["fraction"] == largest
            for t in (r["align_seconds"], r["train_seconds"], r["score_seconds"])
        ]
        return None if None in parts else sum(parts)

    share = "all the questions" if largest == 1.0 else f"share {largest:g}"  # the same steps as at any other share
    rows.append(
        time_row(f"seconds, the inputs at {share}, one seed", [one_seed(seed) for seed in summary["seeds"]], MAX_SECONDS["all inputs"])
    )
    return rows


def _efficiency_plot(path: Path, summary: dict[str, Any], types: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = summary["fractions"]
    scores = ["accuracy", *(f"accuracy/{t}" for t in types)]
    fig, axes = plt.subplots(2, (len(scores) + 1) // 2, figsize=(3.2 * ((len(scores) + 1) // 2), 6), squeeze=False)
    for ax, score in zip(axes.flat, scores):
        for kind, by_fraction in summary["by_input"].items():
            means = [by_fraction[str(f)][score]["mean"] for f in fractions]
            stds = [by_fraction[str(f)][score]["std"] for f in fractions]
            ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=kind)
        kind = score.split("/")[-1]
        if kind in summary["chance"]:
            ax.axhline(summary["chance"][kind], color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(ylim=(0, 1.02), title="all questions" if score == "accuracy" else kind, xlabel="share of the training questions")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
    for ax in list(axes.flat)[len(scores) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_comprehension_report(out: Path, summary: dict[str, Any]) -> Path:
    """The comprehension section of `out/report.md` (replacing an earlier one), with its data-efficiency plot."""
    types = [t for t in QUESTION_TYPES if t in summary["chance"]]
    targets = target_table(comprehension_rows(summary), heading="target (paired by seed)")

    header = "| input | share | all | " + " | ".join(types) + " |"
    rule = "|---" * (len(types) + 3) + "|"
    table = [header, rule]
    for fraction in summary["fractions"]:
        for kind, by_fraction in summary["by_input"].items():
            scores = by_fraction[str(fraction)]
            table.append(
                f"| {kind} | {fraction:g} | {spread_cell(scores.get('accuracy'))} | "
                + " | ".join(spread_cell(scores.get(f"accuracy/{t}")) for t in types)
                + " |"
            )
    table.append("| always the commonest answer | | | " + " | ".join(f"{summary['chance'][t]:.3f}" for t in types) + " |")
    differences = [header.replace("| input |", "| paired difference |"), rule]
    for name, by_fraction in summary["differences"].items():
        for fraction in summary["fractions"]:
            scores = by_fraction[str(fraction)]
            differences.append(
                f"| {name.replace('-', ' − ')} | {fraction:g} | {spread_cell(scores.get('accuracy'))} | "
                + " | ".join(spread_cell(scores.get(f"accuracy/{t}")) for t in types)
                + " |"
            )
    plot = _efficiency_plot(out / "comprehension_efficiency.png", summary, types)
    runs = summary["runs"]
    section = "\n".join([
        COMPREHENSION_SECTION, "",
        f"A tiny LLaVA-style model (the same text-pretrained tiny LM, a 2-layer MLP projector) reading the held-out scenes "
        f"through each visual input: `toklip` (the stage-3 model's per-token features), `codes` (a learned embedding of the "
        f"stage-2 VQ indices) and `teacher` (the stage-1 teacher's patch features). Each input: LLaVA's stage 1 (projector "
        f"only, captions), then stage 2 on a share of the training questions, the same steps for every share; accuracy "
        f"(exact match of the generated answer) on {summary['questions']} held-out questions, mean ± standard deviation over "
        f"seeds {', '.join(map(str, summary['seeds']))}. {len(runs)} runs, all {summary['seconds']['total']:.0f} s.", "",
        *targets, "", *table, "", *differences, "",
        f"![data efficiency]({plot})", "",
    ])  # fmt: skip
    return replace_section(out / "report.md", COMPREHENSION_SECTION, section)
