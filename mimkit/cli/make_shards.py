"""Write a mimkit source as webdataset tar shards: ``mimkit make-shards SOURCE OUT_DIR``.

``python tools/make_shards.py`` runs the same from a checkout. Examples::

    mimkit make-shards folder:/data/imagenet /data/in1k-wds --split train --shard-size 1000 \\
        --format jpg --max-side 320
    mimkit make-shards "synthetic:shapes?size=64&train=4096" /tmp/shapes-wds --shard-size 256

Writes ``OUT_DIR/PREFIX-000000.tar ...`` and ``OUT_DIR/PREFIX-index.json`` (PREFIX defaults to the
split); train on them with ``data.source=wds:OUT_DIR/PREFIX-index.json``. Running the same command
again after an interruption keeps the complete shards and writes the rest. The index is printed.

Samples are written in a random order (``--seed``, default 0), so that a class-ordered source such
as an image folder still gives shards, and hence batches, of many classes; ``--keep-order`` writes
the source's order. The index records which.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mimkit.data.shards import IMAGE_FORMATS, write_shards


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The source, the output folder and the shard options."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Write a mimkit source as resumable webdataset tar shards."
    )
    parser.add_argument("source", help="a source URI: folder:/data/imagenet, synthetic:shapes?size=64 ...")
    parser.add_argument("out_dir", help="folder for the shards and their JSON index")
    parser.add_argument("--split", default="train", help="split of the source to write (default: train)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--prefix", help="shard file name prefix (default: the split)")
    parser.add_argument(
        "--format", default="png", choices=IMAGE_FORMATS, help="image encoding: png (lossless) or jpg (q95)"
    )
    parser.add_argument(
        "--max-side", type=int, help="re-encode images whose longer side exceeds this many pixels"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random order the samples are written in (default: 0)"
    )
    parser.add_argument(
        "--keep-order",
        action="store_true",
        help="write the samples in the source's order (a class-ordered source then gives one-class shards)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Write the shards and print their index; 2 on a bad source or option."""
    args = parse_args(argv, prog)
    try:
        index = write_shards(
            args.source,
            args.out_dir,
            shard_size=args.shard_size,
            split=args.split,
            prefix=args.prefix,
            image_format=args.format,
            max_side=args.max_side,
            seed=args.seed,
            keep_order=args.keep_order,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"make_shards: {err}", file=sys.stderr)
        return 2
    prefix = args.prefix or args.split
    print(
        f"{index['samples']} samples in {len(index['shards'])} shards; "
        f"source: wds:{Path(args.out_dir) / (prefix + '-index.json')}",
        file=sys.stderr,
    )
    print(json.dumps({k: v for k, v in index.items() if k != "shards"} | {"shards": len(index["shards"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
