"""An encoder next to a random init of its shape: weighted k-NN and the cached MAE linear probe.

``mimkit compare-random`` / ``python tools/compare_random.py``:

    mimkit compare-random --encoder runs/demo --train "synthetic:shapes?train=2000&val=500"

Both encoders read the same centre-cropped images (train split of --train as the bank and the
probe's training set, val split of --val, default --train's, as the scored set). The probe is
MAE's (BN + linear, LARS, lr = blr x batch / 256, warm-up then cosine) on cached features at
--effective-batch 256, --blr 1.0 (MAE: 16384 and 0.1, tuned for ImageNet's 1.28M images; see
mimkit/eval/compare.py) and --epochs 90; the table prints both encoders side by side.
With --seg SOURCE (a source with segmentation masks), in-context dense retrieval segmentation
(``mimkit incontext seg --vs-random``'s defaults) runs too, and a last table lists the gains of
pretraining over the random init for every protocol; the JSON holds it under ``incontext``.
The probe's effective batch against the training split, the k-NN ks, and the memory bank of
--seg are checked before any forward pass.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from mimkit.eval.common import add_eval_args, check_common_args, write_json
from mimkit.eval.compare import COMPARE_PROBE, compare_encoders, format_gains
from mimkit.eval.features import load_encoder
from mimkit.eval.incontext import SEG_EXTRACT, check_incontext, compare_incontext
from mimkit.eval.knn import KNN_KS
from mimkit.eval.linear_probe import preset_settings


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run :func:`~mimkit.eval.compare.compare_encoders`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_args(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=list(KNN_KS), help="k-NN neighbour counts")
    parser.add_argument("--epochs", type=int, default=COMPARE_PROBE.epochs, help="probe epochs (%(default)s)")
    parser.add_argument(
        "--effective-batch", type=int, default=COMPARE_PROBE.effective_batch, help="probe batch (%(default)s)"
    )
    parser.add_argument("--blr", type=float, default=COMPARE_PROBE.blr, help="probe base lr (%(default)s)")
    parser.add_argument(
        "--seg",
        default=None,
        help="also run in-context segmentation on this source's train (memory) and val splits, e.g. "
        "'synthetic:shapes?size=64&train=256&val=128'",
    )
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    if args.random_init:
        parser.error(
            "--random-init does not apply: this tool always evaluates the random init beside --encoder"
        )
    if args.cache_dir is not None:
        parser.error("--cache-dir does not apply: both encoders share one pass over the images")
    try:
        probe = preset_settings(
            "mae",
            epochs=args.epochs,
            effective_batch=args.effective_batch,
            batch_size=args.effective_batch,
            blr=args.blr,
        )
        if args.seg is not None:  # fail on a bad segmentation source or memory before any forward pass
            check_incontext(
                load_encoder(args.encoder, img_size=args.img_size, checkpoint=args.checkpoint),
                args.seg,
                device=args.device,
            )
        res = compare_encoders(
            args.encoder,
            args.train,
            args.val,
            checkpoint=args.checkpoint,
            ks=args.ks,
            probe=probe,
            seed=args.seed,
            normalization=args.normalization,
            extract=args.extract,
            json_path=None if args.seg else args.json,
        )
        if args.seg is not None:
            seg = compare_incontext(
                args.encoder,
                args.seg,
                checkpoint=args.checkpoint,
                seed=args.seed,
                normalization=args.normalization,
                extract=replace(
                    args.extract, batch_size=min(args.extract.batch_size, SEG_EXTRACT.batch_size)
                ),
            )
            res["incontext"] = seg
            print(format_gains(res, seg), flush=True)
            if args.json is not None:
                write_json(args.json, res)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
