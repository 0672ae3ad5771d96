"""Nearest-code search (`toklip.tokenizers.base.nearest_code`): in one piece vs in CPU-sized chunks.

On the CPU the search runs a few rows at a time (`CPU_DISTANCE_CHUNK` floats of temporaries); this
prints ms per search both ways for the miniature's VQ step and for VQ-16 batches, and checks that
both give the same indices.

    python experiments/bench_code_search.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from toklip.tokenizers import base

# (rows, codes, code dim): the miniature's VQ step (32 images of 8x8 tokens, 4096 32-d codes),
# its TokLIP step (64 images), and LlamaGen VQ-16 at 256 px for 2 and 16 images.
SHAPES = [(2048, 4096, 32), (4096, 4096, 32), (512, 16384, 8), (4096, 16384, 8)]


def ms_per_search(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int, iters: int) -> tuple[float, torch.Tensor]:
    base.CPU_DISTANCE_CHUNK = chunk
    indices = base.nearest_code(vectors, codebook)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        base.nearest_code(vectors, codebook)
    return (time.perf_counter() - start) / iters * 1e3, indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chunked = base.CPU_DISTANCE_CHUNK
    print(f"\nCPU, {args.threads} thread(s), {args.iters} searches each; ms per search")
    print("| rows x codes x dim | one piece | chunks of 2^18 floats | speed-up | same indices |\n|---|---|---|---|---|")
    for rows, codes, dim in SHAPES:
        vectors, codebook = F.normalize(torch.randn(rows, dim), dim=1), F.normalize(torch.randn(codes, dim), dim=1)
        whole, expected = ms_per_search(vectors, codebook, 2**62, args.iters)
        pieces, indices = ms_per_search(vectors, codebook, chunked, args.iters)
        print(f"| {rows} x {codes} x {dim} | {whole:.1f} | {pieces:.1f} | {whole / pieces:.1f}x | {torch.equal(indices, expected)} |")
    base.CPU_DISTANCE_CHUNK = chunked


if __name__ == "__main__":
    main()
