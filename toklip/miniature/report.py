"""report.md of the miniature: results against the targets, loss curves, scores, reconstructions."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

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


def write_report(out: Path, results: dict[str, Any], seconds: dict[str, float], max_images: int = 8) -> Path:
    rows = ["| target | measured | wanted | met |", "|---|---|---|---|"]
    rows += [f"| {what} | {measured} | {wanted} | {'yes' if met else 'NO'} |" for what, measured, wanted, met in target_rows(results)]
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
