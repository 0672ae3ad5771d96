"""Encode and decode throughput (images/s) of each tokenizer at 256 and 384, fp32 and bf16.

Random weights (speed does not depend on them). bf16 means the tokenizer cast to bf16; the
nearest-code search stays fp32. Runs on CUDA when present, else CPU (use a small --batch there).

    python experiments/bench_tokenizer.py --batch 32 --iters 10
"""

from __future__ import annotations

import argparse
import time

import torch

import toklip


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", nargs="+", default=["llamagen_vq16", "llamagen_vq8", "taming_f16_16384"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 384])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=32 if torch.cuda.is_available() else 2)
    parser.add_argument("--iters", type=int, default=10 if torch.cuda.is_available() else 2)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, batch {args.batch}, {args.iters} iterations\n")
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
                print(f"| {tokenizer_name} | {size} | {dtype_name} | {h}x{w} | {encode:.1f} | {decode:.1f} |", flush=True)


if __name__ == "__main__":
    main()
