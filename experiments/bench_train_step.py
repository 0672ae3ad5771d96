"""A live training step against a cached one, and the encode job against a bare forward: one table.

    python experiments/bench_train_step.py --presets tiny_64 toklip_s_256 --batch 4 --steps 3
    python experiments/bench_train_step.py --presets tiny_64 --batch 64 --encode-images 512   # encode job only at 64 px

Training step: the same TokLIPModule built twice, `inputs=images` (VQ encoder, text tower and teacher
run on every batch) and `inputs=cache` (the student alone, from indices and embeddings), each in a
process of its own so that its peak memory is its own (resident set on the CPU, allocated memory on
a GPU). Weights are random: the arithmetic is the recipe's. A step is forward + backward + AdamW; the
frozen targets of a live step and the AdamW update are also reported on their own lines. The first
step is a warm-up and is not timed.

Encode job: `toklip.encoding.run_encode_job` over JPEG shards with `--workers` loader workers, against
the same FeatureEncoder's `predict_step` over already-decoded batches on the same device: the job's
images/s as a share of the bare forward's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import toklip
from toklip.checkpoints import save_safetensors
from toklip.encoding import FeatureEncoder, input_parts, run_encode_job
from toklip.models.presets import preset as preset_parts
from toklip.models.teacher import build_open_clip
from toklip.training import TokLIPModule
from toklip.training.optim import param_groups

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import write_jpeg_shards  # noqa: E402  (the same photo-like shards)


def weight_files(preset: str, workdir: Path) -> tuple[Path, Path]:
    """Random-init VQ and teacher files of the preset (written once, reused by both modes)."""
    parts = preset_parts(preset)
    vq, teacher = workdir / f"{parts.tokenizer}.safetensors", workdir / f"{parts.teacher}.safetensors"
    if not vq.is_file():
        save_safetensors(toklip.build_tokenizer(parts.tokenizer).state_dict(), vq)
    if not teacher.is_file():
        save_safetensors(build_open_clip(parts.teacher).state_dict(), teacher)
    return vq, teacher


def build_module(preset: str, inputs: str, workdir: Path) -> TokLIPModule:
    vq, teacher = weight_files(preset, workdir)
    return TokLIPModule(preset, tokenizer={"checkpoint": str(vq)}, teacher={"checkpoint": str(teacher)}, inputs=inputs)


def random_batch(module: TokLIPModule, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    size, width = module.architecture.image_size, module.model.embed_dim
    if not module.cached:
        text = module.model.text
        return {
            "image": torch.rand(batch, 3, size, size, device=device) * 2 - 1,
            "text": torch.randint(1, text.vocab_size, (batch, text.context_length), device=device),
        }
    grid = module.model.visual.trunk.grid
    return {
        "indices": torch.randint(0, module.model.tokenizer.codebook_size, (batch, *grid), device=device),
        "teacher_features": torch.randn(batch, width, device=device),
        "text_features": torch.nn.functional.normalize(torch.randn(batch, width, device=device), dim=-1),
    }


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(preset: str, inputs: str, batch: int, steps: int, workdir: Path, device: torch.device, bf16: bool) -> dict[str, float]:
    """Seconds per step (median), of its frozen targets and of the AdamW update, and the peak memory."""
    module = build_module(preset, inputs, workdir).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(module.model.named_parameters(), 0.1), lr=1e-4)
    data = random_batch(module, batch, device)
    times: dict[str, list[float]] = {"step": [], "targets": [], "adamw": []}
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            targets = module.training_targets(data)
            sync(device)
            computed = time.perf_counter()
            loss = sum(module.student_losses(targets).values())
        loss.backward()
        sync(device)
        stepped = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step:  # the first is a warm-up
            times["step"].append(time.perf_counter() - start)
            times["targets"].append(computed - start)
            times["adamw"].append(time.perf_counter() - stepped)
    return {name: statistics.median(values) for name, values in times.items()} | {"peak_gb": peak_memory_gb(device)}


def measure_encode(preset: str, images: int, batch: int, workers: int, workdir: Path, device: torch.device) -> dict[str, float]:
    """Images/s of the encode job, and of a bare forward of the same encoder over decoded batches."""
    model = toklip.build_toklip(preset).eval()
    encoder = FeatureEncoder(model)
    size = model.image_size
    shards = workdir / f"jpeg_{size}_{images}"
    if not shards.is_dir():
        shards.mkdir()
        write_jpeg_shards(shards, images, side=size * 5 // 4, per_shard=max(images // 8, batch))
    parts = input_parts(f"{shards}/*.tar")
    prepare = encoder.prepare()
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        start = time.perf_counter()
        counts = run_encode_job(
            encoder, parts, out, settings={}, prepare=prepare, batch_size=batch, num_workers=workers,
            make_trainer=functools.partial(L.Trainer, accelerator=device.type, devices=1, enable_model_summary=False),
        )  # fmt: skip
        job_seconds = time.perf_counter() - start
    decoded = [prepare(sample)["image"] for part in parts[:4] for sample in part.samples()][: 4 * batch]
    batches = [torch.stack(decoded[i : i + batch]).to(device) for i in range(0, len(decoded), batch)]
    encoder.to(device)
    with torch.inference_mode():
        encoder.predict_step({"inputs": {"image": batches[0]}})  # warm-up
        sync(device)
        start = time.perf_counter()
        for images_batch in batches:
            encoder.predict_step({"inputs": {"image": images_batch}})
        sync(device)
        bare = len(decoded) / (time.perf_counter() - start)
    return {"job": counts["encoded"] / job_seconds, "bare": bare}


def child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.child == "weights":  # written apart, so that no measured process's peak includes making them
        weight_files(args.presets[0], args.workdir)
        result = {}
    elif args.child == "encode":
        result = measure_encode(args.presets[0], args.encode_images, args.batch, args.workers, args.workdir, device)
    else:
        result = measure_step(args.presets[0], args.child, args.batch, args.steps, args.workdir, device, args.bf16)
    print(json.dumps(result))


def run_child(args: argparse.Namespace, what: str, preset: str, batch: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", what, "--presets", preset, "--batch", str(batch), "--steps", str(args.steps),
               "--workdir", str(args.workdir), "--device", args.device, "--workers", str(args.workers),
               "--encode-images", str(args.encode_images), *(["--bf16"] if args.bf16 else [])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{what} {preset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny_64", "toklip_s_256"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="train steps under bf16 autocast (the GPU recipe)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the encode job")
    parser.add_argument("--encode-images", type=int, default=256, help="images the encode job reads (0: skip it)")
    parser.add_argument("--no-steps", action="store_true", help="only the encode job")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "toklip_bench_train_step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    print(f"device {args.device}, batch {args.batch}, {torch.get_num_threads()} threads, {args.steps} timed steps (median)\n")
    print("| preset | step | samples/s | s/step | frozen targets s | AdamW s | peak GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        if args.no_steps:
            break
        run_child(args, "weights", preset, args.batch)
        results = {mode: run_child(args, mode, preset, args.batch) for mode in ("images", "cache")}
        for mode, r in results.items():
            print(
                f"| {preset} | {'live' if mode == 'images' else 'cached'} | {args.batch / r['step']:.2f} | {r['step']:.3f} | "
                f"{r['targets']:.3f} | {r['adamw']:.3f} | {r['peak_gb']:.2f} |"
            )
        live, cached = results["images"], results["cache"]
        print(
            f"| {preset} | cached / live | {live['step'] / cached['step']:.2f}x | | | | {live['peak_gb'] - cached['peak_gb']:+.2f} saved |"
        )
    if args.encode_images:
        print(f"\n| preset | encode job img/s ({args.workers} workers) | bare forward img/s | job / bare |")
        print("|---|---:|---:|---:|")
        for preset in args.presets:
            r = run_child(args, "encode", preset, args.batch)
            print(f"| {preset} | {r['job']:.3g} | {r['bare']:.3g} | {r['job'] / r['bare']:.0%} |")


if __name__ == "__main__":
    main()
