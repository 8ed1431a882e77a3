"""Throughput benchmarks: ``python tools/benchmark.py SUBCOMMAND ...``.

Subcommands (each registered in :data:`SUBCOMMANDS`; the larger ones live in :mod:`mimkit.bench`)::

    data SOURCE [SOURCE ...]   decoded-and-augmented images/s per DataLoader worker count
    peak                       matmul GFLOP/s at a model's shapes, fp32 and bf16 (utilisation denominator)
    step                       one training step: trainer path vs a bare reference MAE step
    pipeline RECIPE            end-to-end pretraining images/s, real data vs pre-decoded tensors
    masks                      milliseconds to draw a batch of masks, per mask type
    incontext                  in-context retrieval queries/s against memory size
    quality RECIPE             frozen-feature quality: trainer path vs a plain loop vs the random init

Example, the folder and shard paths on the same images::

    python tools/make_shards.py folder:/data/imagenet /data/in1k-wds --format jpg
    python tools/benchmark.py data folder:/data/imagenet wds:/data/in1k-wds/train-index.json \\
        --workers 0 1 2 4 --images 2000 --json benchmarks/data.json

Every subcommand prints a table and the same numbers as one JSON line (and writes them to
``--json PATH`` when given). Speed depends on what else the machine runs: note its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


from benchmarks import quality  # noqa: E402  (top-level, outside the package)
from mimkit.bench import incontext, masks, peak, pipeline, step  # noqa: E402
from mimkit.bench.common import machine_info  # noqa: E402


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


def data(args: argparse.Namespace) -> dict:
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


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", help="source URIs: folder:PATH, wds:INDEX.json, synthetic:...")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (0 1 2)")
    parser.add_argument("--images", type=int, default=512, help="timed images per run (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--img-size", type=int, default=224, help="augmented image side (default 224)")
    parser.add_argument("--transform", default="pretrain", help="transform kind (default pretrain)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the best counts (default 3)")


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable, str]] = {
    "data": (data, _data_args, "decoded-and-augmented images/s per worker count"),
    "peak": (peak.run, peak.add_args, "matmul GFLOP/s at the model's shapes, fp32 and bf16"),
    "step": (step.run, step.add_args, "trainer-path training step vs a bare reference MAE step"),
    "pipeline": (pipeline.run, pipeline.add_args, "end-to-end pretraining images/s, real vs pre-decoded"),
    "masks": (masks.run, masks.add_args, "milliseconds to draw a batch of masks per mask type"),
    "incontext": (incontext.run, incontext.add_args, "in-context retrieval queries/s against memory size"),
    "quality": (quality.run, quality.add_args, "encoder quality at equal steps: trainer path vs plain loop"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mimkit throughput benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.add_argument("--json", help="also write the result as JSON to this path")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        result = SUBCOMMANDS[args.command][0](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"benchmark {args.command}: {err}", file=sys.stderr)
        return 2
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
