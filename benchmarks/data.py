"""``python tools/benchmark.py data [SOURCE ...] [--diversity]``: images/s per worker count, and
the class mix of a batch read from shards.

Images/s: each source decoded and augmented as the trainer reads it, per DataLoader worker count.
Example, the folder and shard paths on the same images::

    python tools/make_shards.py folder:/data/imagenet /data/in1k-wds --format jpg
    python tools/benchmark.py data folder:/data/imagenet wds:/data/in1k-wds/train-index.json \\
        --workers 0 1 2 4 --images 2000 --json benchmarks/data.json

Class mix (``--diversity``): a class-ordered image folder (classes listed one after another, as an
ImageNet folder is) is written as shards twice, in the writer's default shuffled order and with
``--keep-order``, and read as the trainer reads ``wds:`` (a resampled stream through the shuffle
buffer); the mean number of distinct labels per batch is set against the expected number in a
batch of a random permutation. The defaults copy the recipes' settings at a smaller scale: shards
of 1000 and a shuffle buffer of 1000 (the ``wds:`` defaults), batches of 32 and 64 (the ViT-L and
ViT-B micro batches), 1300 images per class (ImageNet's 1281, about one class per shard).

Against another checkout (``--against-tree DIR``, e.g. an older version from ``git archive``): each
source is timed by this checkout and by DIR in turn, ``--pairs`` times per worker count (each by
its own ``_images_per_s`` in a process of its own that stays up, so a pair's two runs are seconds
apart; DIR runs first in even pairs, second in odd ones; a ``wds:`` stream seeded by the pair's
number, the same for both), and each pair gives a ratio, this checkout's images/s over DIR's. The
two runs of a pair share the machine's state, so the median ratio is steadier than either side's
best run::

    git archive a3ccdd3^ | tar -x -C /tmp/oldmimkit
    python tools/benchmark.py data wds:/tmp/wds_bench/wds/train-index.json --against-tree /tmp/oldmimkit \\
        --workers 0 1 2 --images 600 --pairs 16 --json benchmarks/data_reader_ab2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import machine_info


def expected_distinct_labels(class_sizes: Sequence[int], batch: int) -> float:
    """Mean distinct labels in ``batch`` samples drawn without replacement: a random permutation's batch.

    Class ``c`` of ``n_c`` among ``N`` samples is absent from a batch with probability
    ``C(N - n_c, B) / C(N, B)``, the product of ``(N - n_c - i) / (N - i)`` over ``i < B``.
    """
    total = sum(class_sizes)
    expected = 0.0
    for size in class_sizes:
        absent = 1.0
        for i in range(batch):
            absent *= max(total - size - i, 0) / (total - i)
        expected += 1.0 - absent
    return expected


def write_class_ordered_folder(root: Path, classes: int, per_class: int, size: int = 4) -> None:
    """``classes`` folders of ``per_class`` tiny PNGs each: a folder source lists them class by class."""
    from PIL import Image

    for c in range(classes):
        folder = root / f"class{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (c % 256, i % 256, 0)).save(folder / f"{i:05d}.png")


def mean_distinct_labels(source: str, batch: int, batches: int, seed: int = 0) -> float:
    """Mean distinct labels per batch of a ``wds:`` source read as the trainer reads it.

    One process: each DataLoader worker fills its batches from its own stream, so one stream's
    batches are what any worker count gives.
    """
    from torch.utils.data import DataLoader

    from mimkit.data import build_source

    dataset = build_source(source, "train", None)
    dataset.configure(resample=True, samples=batch * batches, batch=batch, seed=seed)
    distinct = [len(set(b["label"].tolist())) for b in DataLoader(dataset, batch_size=batch)]
    return sum(distinct) / len(distinct)


def _diversity(args: argparse.Namespace) -> list[dict]:
    """Distinct labels per batch, shuffled and kept-order writing, against a random permutation's."""
    from mimkit.data import write_shards

    rows = []
    with tempfile.TemporaryDirectory(prefix="mimkit-diversity-") as tmp:
        folder = Path(tmp) / "folder"
        write_class_ordered_folder(folder, args.diversity_classes, args.diversity_per_class)
        sizes = [args.diversity_per_class] * args.diversity_classes
        for order in ("shuffled", "source"):
            out = Path(tmp) / order
            keep = order == "source"
            write_shards(
                f"folder:{folder}", out, shard_size=args.diversity_shard_size, keep_order=keep, progress=False
            )
            spec = f"wds:{out}/train-index.json?shuffle={args.diversity_shuffle}"
            for batch in args.diversity_batch:
                measured = mean_distinct_labels(spec, batch, args.diversity_batches)
                expected = expected_distinct_labels(sizes, batch)
                rows.append(
                    {
                        "written": order,
                        "batch": batch,
                        "shuffle": args.diversity_shuffle,
                        "distinct_per_batch": round(measured, 2),
                        "random_permutation": round(expected, 2),
                        "ratio": round(measured / expected, 3),
                    }
                )
    print(f"\n{'written':<9} batch  shuffle  distinct/batch  random permutation  ratio")
    for r in rows:
        print(
            f"{r['written']:<9} {r['batch']:>5}  {r['shuffle']:>7}  {r['distinct_per_batch']:>14.2f}  "
            f"{r['random_permutation']:>18.2f}  {r['ratio']:>5.3f}"
        )
    return rows


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


def _speeds(args: argparse.Namespace) -> list[dict]:
    """Images/s per worker count for each source."""
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
    return rows


# A checkout's own ``_images_per_s`` (its mimkit imported from it), run once per line of arguments.
_SERVE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.data import _images_per_s
for line in sys.stdin:
    print(_images_per_s(*json.loads(line)), flush=True)
"""


def _seeded(source: str, seed: int) -> str:
    """A ``wds:`` spec that reads the stream of ``seed`` (unless it names one), other sources as they are.

    Each pair then reads other samples under other crops, so neither checkout keeps one stream's
    share of cheap or costly images for every run.
    """
    if not source.startswith("wds:") or "seed=" in source:
        return source
    return f"{source}{'&' if '?' in source else '?'}seed={seed}"


def _against(args: argparse.Namespace) -> list[dict]:
    """Alternated runs of DIR and this checkout, each in a process of its own that stays up between
    its runs (so a pair is seconds apart); per pair, this checkout's images/s over DIR's."""
    if args.pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {args.pairs}")
    this, other = Path(__file__).resolve().parents[1], Path(args.against_tree).resolve()
    if not (other / "benchmarks" / "data.py").is_file():
        raise FileNotFoundError(f"--against-tree {other} has no benchmarks/data.py")
    servers = [
        subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(tree)],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},  # its own mimkit, not this one
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for tree in (other, this)
    ]

    def one_run(server: subprocess.Popen, source: str, workers: int) -> float:
        options = [source, workers, args.images, args.batch, args.img_size, args.transform]
        server.stdin.write(json.dumps(options) + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        if not answer:
            raise ValueError(f"the benchmark process of {server.args[-1]} failed on {source} (see above)")
        return round(float(answer), 1)

    rows = []
    try:
        for source in args.sources:
            for workers in args.workers:
                runs = []
                for pair in range(args.pairs):  # DIR first, then this checkout first: drift cancels
                    order = (0, 1) if pair % 2 == 0 else (1, 0)
                    speed = {k: one_run(servers[k], _seeded(source, pair), workers) for k in order}
                    runs.append((speed[0], speed[1]))
                ratios = [mine / theirs for theirs, mine in runs]
                rows.append(
                    {
                        "source": source,
                        "workers": workers,
                        "against_images_per_s": [theirs for theirs, _ in runs],
                        "this_images_per_s": [mine for _, mine in runs],
                        "ratios": [round(r, 3) for r in ratios],
                        "median_ratio": round(statistics.median(ratios), 3),
                    }
                )
                theirs, mine = (statistics.median(side) for side in zip(*runs))
                spread, median = f"{min(ratios):.3f}-{max(ratios):.3f}", rows[-1]["median_ratio"]
                print(
                    f"{source} {workers} workers: {other.name} {theirs:.1f}, this {mine:.1f} images/s "
                    f"(medians); ratios {spread}, median {median:.3f}"
                )
    finally:
        for server in servers:
            server.stdin.close()
            server.wait()
    return rows


def run(args: argparse.Namespace) -> dict:
    """``data``: images/s per worker count for each source; with ``--diversity``, the class mix."""
    if not args.sources and not args.diversity:
        raise ValueError("give sources to time, --diversity, or both")
    machine = machine_info()
    options = {k: getattr(args, k) for k in ("images", "batch", "img_size", "transform", "repeat")}
    result = {"benchmark": "data", "options": options, "machine": machine}
    if args.against_tree:  # each run of a pair is a single one
        options["repeat"], options["pairs"] = 1, args.pairs
        result["against_tree"] = str(Path(args.against_tree).resolve())
        result["results"] = _against(args) if args.sources else []
    else:
        result["results"] = _speeds(args) if args.sources else []
    if args.diversity:
        keys = ("classes", "per_class", "shard_size", "shuffle", "batch", "batches")
        result["diversity_options"] = {k: getattr(args, f"diversity_{k}") for k in keys}
        result["diversity"] = _diversity(args)
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", help="source URIs: folder:PATH, wds:INDEX.json, synthetic:...")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (0 1 2)")
    parser.add_argument("--images", type=int, default=512, help="timed images per run (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--img-size", type=int, default=224, help="augmented image side (default 224)")
    parser.add_argument("--transform", default="pretrain", help="transform kind (default pretrain)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the best counts (default 3)")
    parser.add_argument(
        "--against-tree",
        metavar="DIR",
        help="time each source from this checkout and from DIR in alternation, pair by pair",
    )
    parser.add_argument("--pairs", type=int, default=5, help="runs of each checkout with --against-tree (5)")
    parser.add_argument(
        "--diversity", action="store_true", help="also measure distinct labels per batch of shards"
    )
    parser.add_argument("--diversity-classes", type=int, default=100, help="classes (default 100)")
    parser.add_argument("--diversity-per-class", type=int, default=1300, help="images per class (1300)")
    parser.add_argument("--diversity-shard-size", type=int, default=1000, help="samples per shard (1000)")
    parser.add_argument("--diversity-shuffle", type=int, default=1000, help="wds: shuffle buffer (1000)")
    parser.add_argument(
        "--diversity-batch", type=int, nargs="+", default=[32, 64], help="batch sizes (32 64)"
    )
    parser.add_argument("--diversity-batches", type=int, default=100, help="batches read per setting (100)")
