"""``python tools/benchmark.py data SOURCE [SOURCE ...]``: decoded-and-augmented images/s per worker count.

Example, the folder and shard paths on the same images::

    python tools/make_shards.py folder:/data/imagenet /data/in1k-wds --format jpg
    python tools/benchmark.py data folder:/data/imagenet wds:/data/in1k-wds/train-index.json \\
        --workers 0 1 2 4 --images 2000 --json benchmarks/data.json
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import machine_info


def _images_per_s(source: str, workers: int, images: int, batch: int, img_size: int, transform: str) -> float:
    """Decode and augment ``images`` images of ``source`` with ``workers`` workers; images per second.

    The first batch is excluded, so worker start-up does not count. A map-style source is read in
    random order and a ``wds:`` source as a resampled stream, each as the trainer reads it.
    """
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from mimkit.data import build_source, build_transform

    dataset = build_source(source, "train", build_transform(transform, img_size))
    iterable = isinstance(dataset, IterableDataset)
    if iterable:
        dataset.configure(resample=True, samples=images + 2 * batch * max(workers, 1), batch=batch)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=not iterable,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    count, start = 0, None
    for batch_dict in loader:
        if start is None:
            start = time.perf_counter()
            continue
        count += len(batch_dict["image"])
        if count >= images:
            break
    if start is None or count == 0:
        raise ValueError(f"{source} holds too few images for one timed batch of {batch}")
    return count / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    """``data``: images/s per worker count for each source."""
    from tqdm import tqdm

    rows = []
    runs = [(s, w) for s in args.sources for w in args.workers]
    for source, workers in tqdm(runs, desc="benchmark data", unit="run", disable=args.no_progress):
        speed = max(  # the best of the repeats: other load on the machine only ever slows a run down
            _images_per_s(source, workers, args.images, args.batch, args.img_size, args.transform)
            for _ in range(args.repeat)
        )
        rows.append(
            {
                "source": source,
                "workers": workers,
                "images_per_s": round(speed, 1),
                "images_per_s_per_worker": round(speed / max(workers, 1), 1),
            }
        )
    width = max(len(r["source"]) for r in rows)
    print(f"{'source':<{width}}  workers  images/s  per worker")
    for r in rows:
        print(
            f"{r['source']:<{width}}  {r['workers']:>7}  {r['images_per_s']:>8.1f}  "
            f"{r['images_per_s_per_worker']:>10.1f}"
        )
    options = {k: getattr(args, k) for k in ("images", "batch", "img_size", "transform", "repeat")}
    return {"benchmark": "data", "options": options, "machine": machine_info(), "results": rows}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", help="source URIs: folder:PATH, wds:INDEX.json, synthetic:...")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (0 1 2)")
    parser.add_argument("--images", type=int, default=512, help="timed images per run (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--img-size", type=int, default=224, help="augmented image side (default 224)")
    parser.add_argument("--transform", default="pretrain", help="transform kind (default pretrain)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the best counts (default 3)")
