"""Linear segmentation probe of a frozen encoder (DINOv2's protocol), with --vs-random beside a random init.

``mimkit seg-probe`` / ``python tools/seg_probe.py``:

    mimkit seg-probe --encoder export/ --train voc:/data/VOCdevkit/VOC2012 --img-size 512
    mimkit seg-probe --encoder export/ --train ade20k:/data/ADEChallengeData2016 --img-size 512 \\
        --json seg_ade.json
    mimkit seg-probe --encoder runs/demo --train "synthetic:textures?size=64&train=256&val=128" \\
        --cached --iterations 2000 --vs-random

A linear head (--head bn: BatchNorm + 1x1 conv, DINOv2's BNHead; --head linear: the conv alone)
on the final-normed patch tokens of the last block (--n-last-blocks 4: the last 4, concatenated,
DINOv2's lin+4), logits upsampled bilinearly to the label map, pixel cross-entropy with the
ignore label left out. DINOv2's settings are the defaults: AdamW lr 1e-3, weight decay 1e-4,
40,000 iterations of 16 images (--batch-size), poly decay after a linear warm-up over 1,500
(--warmup-iters; by default the same 1,500/40,000 fraction of --iterations); training images
rescaled 0.5-2x, cropped to the input size (--img-size; DINOv2: 512) and flipped. --cached trains
on tokens extracted once from the resized images, without augmentation: much faster, and labelled
as a different protocol. On a CPU, pass fewer --iterations.

Reported on the val split of --val (default: --train's), with the in-context tool's metrics: mIoU
(identity mapping, primary; Hungarian-matched), per-class IoU, pixel accuracy. The run's plan
(forward passes, memory) is printed before it starts; --vs-random also probes a random init of
the same shape and prints both with the gain.
"""

from __future__ import annotations

import argparse
import sys

from mimkit.eval.common import add_eval_args, check_common_args, encoder_from_args, write_json
from mimkit.eval.seg_head import DINOV2_ITERATIONS, HEADS, SegProbe
from mimkit.eval.seg_probe import compare_seg_probe, format_seg_probe, seg_probe

DEFAULTS = SegProbe()


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_args(
        parser,
        batch_size=DEFAULTS.batch_size,
        batch_size_help="images per training iteration (DINOv2: 16 = 2 per GPU x 8) and per frozen "
        "forward pass (%(default)s)",
    )
    parser.add_argument("--head", choices=HEADS, default=DEFAULTS.head, help="head (%(default)s)")
    parser.add_argument(
        "--n-last-blocks",
        type=int,
        default=DEFAULTS.n_last_blocks,
        help="blocks whose patch tokens are concatenated (%(default)s; 4: DINOv2's lin+4)",
    )
    parser.add_argument(
        "--iterations", type=int, default=DINOV2_ITERATIONS, help="training iterations (%(default)s)"
    )
    parser.add_argument(
        "--warmup-iters", type=int, default=None, help="linear warm-up (default: 1500/40000 of --iterations)"
    )
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="AdamW lr (%(default)s)")
    parser.add_argument(
        "--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay (%(default)s)"
    )
    parser.add_argument(
        "--cached", action="store_true", help="train on tokens extracted once, no augmentation"
    )
    parser.add_argument("--vs-random", action="store_true", help="also probe a random init, side by side")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run :func:`~mimkit.eval.seg_probe.seg_probe`."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    if args.cache_dir is not None:
        parser.error("--cache-dir does not apply to seg-probe: --cached keeps the patch tokens in memory")
    if args.vs_random and args.random_init:
        parser.error("--vs-random already probes the random init beside --encoder; drop --random-init")
    try:
        settings = SegProbe(
            head=args.head, n_last_blocks=args.n_last_blocks, iterations=args.iterations,
            batch_size=args.batch_size, warmup_iters=args.warmup_iters, lr=args.lr,
            weight_decay=args.weight_decay, seed=args.seed,
        )  # fmt: skip
        if args.vs_random:
            res = compare_seg_probe(
                args.encoder, args.train, args.val, settings=settings, cached=args.cached,
                checkpoint=args.checkpoint, seed=args.seed, normalization=args.normalization,
                extract=args.extract,
            )  # fmt: skip
        else:
            encoder = encoder_from_args(args)
            res = seg_probe(
                encoder, args.train, args.val, settings=settings, cached=args.cached, extract=args.extract
            )
            print(format_seg_probe(res))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.json is not None:
        print(f"wrote {write_json(args.json, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
