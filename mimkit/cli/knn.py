"""Weighted k-NN (DINO) and few-shot k-NN of a frozen encoder: ``mimkit knn`` / ``python tools/knn.py``.

    mimkit knn --encoder runs/demo --train "synthetic:shapes?train=2000&val=500"
    mimkit knn --encoder export/ --train folder:/data/imagenet --json knn.json
    mimkit knn --encoder runs/demo --train ... --random-init     # the untrained floor

The bank is the train split of --train, the queries the val split of --val (default: --train's),
both centre-cropped. Features are the final-normed cls token (--feature patch_mean for the mean
patch token), L2-normalised; votes are weighted by exp(cosine / 0.07) for k in {10, 20, 100, 200}.
Few-shot draws n images per class (--shots, default 1 2 5 10) --tries times and reports the mean
and standard deviation; --shots with no value skips it. A k beyond the bank or shots beyond the
smallest class are refused, with the largest valid value, before any forward pass.
"""

from __future__ import annotations

import argparse
import sys

from mimkit.eval.common import add_eval_args, check_common_args, encoder_from_args, write_json
from mimkit.eval.knn import (
    FEW_SHOT_N,
    FEW_SHOT_TRIES,
    KNN_FEATURES,
    KNN_KS,
    KNN_TEMPERATURE,
    format_knn,
    knn_eval,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run :func:`~mimkit.eval.knn.knn_eval`, print its table."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_args(parser)
    parser.add_argument(
        "--ks", type=int, nargs="+", default=list(KNN_KS), help="neighbour counts (%(default)s)"
    )
    parser.add_argument(
        "--temperature", type=float, default=KNN_TEMPERATURE, help="vote temperature (%(default)s)"
    )
    parser.add_argument(
        "--feature", choices=KNN_FEATURES, default="cls", help="feature compared (%(default)s)"
    )
    parser.add_argument(
        "--shots",
        type=int,
        nargs="*",
        default=list(FEW_SHOT_N),
        help="few-shot images per class (%(default)s)",
    )
    parser.add_argument(
        "--tries", type=int, default=FEW_SHOT_TRIES, help="few-shot draws per n (%(default)s)"
    )
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    try:
        encoder = encoder_from_args(args)
        res = knn_eval(
            encoder,
            args.train,
            args.val,
            ks=args.ks,
            temperature=args.temperature,
            feature=args.feature,
            shots=args.shots,
            tries=args.tries,
            seed=args.seed,
            extract=args.extract,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(format_knn(res))
    if args.json is not None:
        print(f"wrote {write_json(args.json, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
