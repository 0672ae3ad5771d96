"""Training-loader throughput: TokLIPDataModule vs a bare webdataset + PIL loop, same shards, same run.

    python experiments/bench_data.py --images 600 --workers 1

Both loaders decode the same local JPEG shards with the same train transform (RandomResizedCrop,
bicubic, normalise) in `--workers` DataLoader workers; TokLIPDataModule also shuffles, checks and
counts bad samples, converts modes and tokenizes captions. Prints images/s per worker.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

import toklip
from toklip.data import TokLIPDataModule, preprocess_config, train_transform


def write_jpeg_shards(directory: Path, images: int, side: int, per_shard: int = 100) -> str:
    """Photo-like JPEGs (smooth colour fields plus noise) at `side` px, as img2dataset writes them."""
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(directory / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index in range(images):
            coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
            noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (side * 3 // 4, side, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            sink.write({"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": f"a photo number {index} of a colourful field"})
    last = (images - 1) // per_shard
    return str(directory / f"{{00000..{last:05d}}}.tar")


def images_per_second(loader, batch_size: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, count = time.perf_counter(), 0
    for _ in iterator:
        count += batch_size
    return count / (time.perf_counter() - start)


def bare_loader(urls: str, size: int, batch_size: int, workers: int) -> DataLoader:
    transform = train_transform(preprocess_config(size))
    pipeline = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda text: text)
        .batched(batch_size, partial=False)
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384])
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = toklip.get_text_tokenizer("tiny_64")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            # Source images a little larger than the target, as img2dataset's resize leaves them.
            folder = Path(tmp) / str(size)
            folder.mkdir()
            urls = write_jpeg_shards(folder, args.images, side=size * 5 // 4)
            dm = TokLIPDataModule(
                urls, text_tokenizer=tokenizer, image_size=size, train_num_samples=args.images,
                batch_size_per_device=args.batch_size, num_workers=args.workers, persistent_workers=False,
            )  # fmt: skip
            ours = images_per_second(dm.train_loader(), args.batch_size)
            bare = images_per_second(bare_loader(urls, size, args.batch_size, args.workers), args.batch_size)
            rows.append((size, ours / args.workers, bare / args.workers, ours / bare))
    print(f"\n{args.images} JPEGs, {args.workers} worker(s), batch {args.batch_size}; images/s per worker")
    print("| size | TokLIPDataModule | bare webdataset + PIL | ratio |\n|---|---|---|---|")
    for size, ours, bare, ratio in rows:
        print(f"| {size} | {ours:.0f} | {bare:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
