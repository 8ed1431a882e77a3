"""Throughput benchmarks: ``python tools/benchmark.py SUBCOMMAND ...``.

Subcommands (each registered in :data:`SUBCOMMANDS`, one module of the top-level ``benchmarks/``
folder each, beside the results they produced; ``import mimkit`` imports none of them)::

    data SOURCE [SOURCE ...]   decoded-and-augmented images/s per DataLoader worker count
    peak                       matmul GFLOP/s at a model's shapes, fp32 and bf16 (utilisation denominator)
    step                       one training step: trainer path vs a bare reference MAE step
    pipeline RECIPE            end-to-end pretraining images/s, real data vs pre-decoded tensors
    masks                      milliseconds to draw a batch of masks, per mask type
    incontext                  in-context retrieval queries/s against memory size
    extract                    feature extraction images/s against the encoder's forward alone
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
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


from benchmarks import data, extract, incontext, masks, peak, pipeline, quality, step  # noqa: E402
from mimkit.files import atomic_write_text  # noqa: E402

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable, str]] = {
    "data": (data.run, data.add_args, "decoded-and-augmented images/s per worker count"),
    "peak": (peak.run, peak.add_args, "matmul GFLOP/s at the model's shapes, fp32 and bf16"),
    "step": (step.run, step.add_args, "trainer-path training step vs a bare reference MAE step"),
    "pipeline": (pipeline.run, pipeline.add_args, "end-to-end pretraining images/s, real vs pre-decoded"),
    "masks": (masks.run, masks.add_args, "milliseconds to draw a batch of masks per mask type"),
    "incontext": (incontext.run, incontext.add_args, "in-context retrieval queries/s against memory size"),
    "extract": (extract.run, extract.add_args, "feature extraction images/s against the forward alone"),
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
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
