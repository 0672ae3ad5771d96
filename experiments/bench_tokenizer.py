"""Encode and decode throughput (images/s) of each tokenizer at 256 and 384, fp32 and bf16; then IBQ's
code search (262,144 codes) at 256 and 512, in pieces against one piece.

Random weights (speed does not depend on them). bf16 means the tokenizer cast to bf16; the
nearest-code search stays fp32. Runs on CUDA when present, else CPU (use a small --batch there).
The IBQ table times the search alone, on random latents of the image's token grid; its memory is
the scores held at once (measured on CUDA as the peak allocated during the search; on a CPU, counted).

    python experiments/bench_tokenizer.py --batch 32 --iters 10
    python experiments/bench_tokenizer.py --tokenizers --ibq ibq_262144 --batch 2 --iters 2   # the IBQ table only
"""

from __future__ import annotations

import argparse
import time

import torch

import toklip
from toklip.tokenizers.ibq import MAX_SCORES


def _images_per_second(fn, batch: int, iters: int, device: torch.device) -> float:
    fn()  # warm-up (cudnn autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def _ibq_search_row(tokenizer, size: int, batch: int, iters: int, device: torch.device, one_piece: bool) -> str:
    h, w = tokenizer.grid(size)
    latents = torch.randn(batch, tokenizer.code_dim, h, w, device=device)
    codebook = tokenizer.codebook()
    rows = batch * h * w
    if one_piece:
        z = latents.permute(0, 2, 3, 1).reshape(rows, -1)
        search = lambda: (z @ codebook.t()).argmax(dim=1)  # noqa: E731
        held = rows * tokenizer.codebook_size
    else:
        search = lambda: tokenizer.quantize_latents(latents)  # noqa: E731
        held = min(rows * tokenizer.codebook_size, tokenizer.max_search_scores or MAX_SCORES.get(device.type, MAX_SCORES["cuda"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    speed = _images_per_second(search, batch, iters, device)
    memory = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else held * 4 / 2**20
    piece = "one piece" if one_piece else "in pieces"
    return f"| {size} | {h}x{w} | {piece} | {rows:,} x {tokenizer.codebook_size:,} | {speed:.2f} | {memory:,.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", nargs="*", default=["llamagen_vq16", "llamagen_vq8", "taming_f16_16384"])
    parser.add_argument("--ibq", nargs="*", default=["ibq_262144"], help="IBQ tokenizers whose search to time")
    parser.add_argument("--ibq-sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--one-piece-limit", type=float, default=8.0, help="GiB: the one-piece search runs where its scores fit")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 384])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=32 if torch.cuda.is_available() else 2)
    parser.add_argument("--iters", type=int, default=10 if torch.cuda.is_available() else 2)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, batch {args.batch}, {args.iters} iterations\n")
    if args.tokenizers:
        print("| tokenizer | size | dtype | grid | encode img/s | decode img/s |\n|---|---|---|---|---|---|")
    for tokenizer_name in args.tokenizers:
        for dtype_name in args.dtypes:
            dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
            tokenizer = toklip.build_tokenizer(tokenizer_name).to(device=device, dtype=dtype)
            for size in args.sizes:
                images = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
                indices = tokenizer.encode(images).indices
                encode = _images_per_second(lambda t=tokenizer, x=images: t.encode(x), args.batch, args.iters, device)
                decode = _images_per_second(lambda t=tokenizer, i=indices: t.decode(i), args.batch, args.iters, device)
                h, w = tokenizer.grid(size)
                print(f"| {tokenizer_name} | {size} | {dtype_name} | {h}x{w} | {encode:.3g} | {decode:.3g} |", flush=True)
    for tokenizer_name in args.ibq:
        tokenizer = toklip.build_tokenizer(tokenizer_name).to(device)
        print(f"\n{tokenizer_name}: search (images/s) and its memory (MiB of scores)\n")
        print("| size | grid | search | scores | img/s | memory MiB |\n|---|---|---|---|---|---|")
        for size in args.ibq_sizes:
            print(_ibq_search_row(tokenizer, size, args.batch, args.iters, device, one_piece=False), flush=True)
            h, w = tokenizer.grid(size)
            if args.batch * h * w * tokenizer.codebook_size * 4 <= args.one_piece_limit * 2**30:
                print(_ibq_search_row(tokenizer, size, args.batch, args.iters, device, one_piece=True), flush=True)


if __name__ == "__main__":
    main()
