"""Sampling speed of the generator over VQ indices: incremental (the generator's KV cache and TokLIP's
incremental causal pass) against recomputing the whole prefix for every token.

    python experiments/bench_generation.py --preset tiny_64 --generator tiny --batch 8

Both paths sample the same number of tokens greedily from random weights; the recomputing path runs
the generator over its whole prefix, and (in `codes+toklip`) TokLIP's causal pass over every index so
far, at each step. Prints tokens/s (batch x tokens / seconds).
"""

from __future__ import annotations

import argparse
import time

import torch

import toklip
from toklip.generation import TokenGenerator
from toklip.models import CausalCache


@torch.no_grad()
def sample_recomputing(gpt: TokenGenerator, labels: torch.Tensor, model: toklip.TokLIP, tokens: int) -> torch.Tensor:
    prefix = gpt.condition_tokens(labels)
    indices = torch.empty(len(labels), 0, dtype=torch.long)
    for _ in range(tokens):
        features = model.extend_indices(indices, CausalCache()) if gpt.toklip_projection is not None and indices.shape[1] else None
        inputs = torch.cat([prefix, gpt.token_inputs(indices, features)], dim=1) if indices.shape[1] else prefix
        logits = gpt.head(gpt.backbone(inputs_embeds=inputs).last_hidden_state[:, -1])
        indices = torch.cat([indices, logits.argmax(-1, keepdim=True)], dim=1)
    return indices


@torch.no_grad()
def sample_incremental(gpt: TokenGenerator, labels: torch.Tensor, model: toklip.TokLIP, tokens: int) -> torch.Tensor:
    stream, indices = gpt.stream(labels, model), []
    for position in range(tokens):
        indices.append(stream.logits.argmax(-1, keepdim=True))
        if position < tokens - 1:
            stream.advance(indices[-1])
    return torch.cat(indices, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_64")
    parser.add_argument("--generator", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=None, help="tokens to sample (default: the whole grid)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = toklip.build_toklip(args.preset).eval()
    trunk = model.visual.trunk
    tokens = args.tokens or trunk.num_tokens
    labels = torch.arange(args.batch) % 10
    print(f"{args.preset}, generator {args.generator}, batch {args.batch}, {tokens} tokens, {torch.get_num_threads()} threads\n")
    print("| input | incremental tok/s | recomputing tok/s | speed-up | same samples |")
    print("|---|---:|---:|---:|---|")
    for mode in ("codes", "codes+toklip"):
        gpt = TokenGenerator(
            args.generator, codebook_size=model.tokenizer.codebook_size, num_tokens=trunk.num_tokens, num_classes=10,
            input_mode=mode, toklip_width=trunk.spec.width,
        ).eval()  # fmt: skip
        seconds, samples = {}, {}
        for name, sample in (("incremental", sample_incremental), ("recomputing", sample_recomputing)):
            start = time.perf_counter()
            samples[name] = sample(gpt, labels, model, tokens)
            seconds[name] = time.perf_counter() - start
        rate = {name: args.batch * tokens / s for name, s in seconds.items()}
        same = torch.equal(samples["incremental"], samples["recomputing"])
        print(
            f"| {mode} | {rate['incremental']:.0f} | {rate['recomputing']:.0f} | {rate['incremental'] / rate['recomputing']:.1f}x | {same} |"
        )


if __name__ == "__main__":
    main()
