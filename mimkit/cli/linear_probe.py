"""Linear probe of a frozen encoder: MAE's protocol (--preset mae) or DINOv2's head grid (--preset grid).

``mimkit linear-probe`` / ``python tools/linear_probe.py``:

    mimkit linear-probe --encoder export/ --train folder:/data/imagenet --preset mae
    mimkit linear-probe --encoder export/ --train folder:/data/imagenet --preset grid
    mimkit linear-probe --encoder runs/demo --train "synthetic:shapes?train=2000&val=500" \\
        --preset mae --cached --effective-batch 256

mae: BN (no affine) + linear on the cls token, LARS, lr = 0.1 x effective batch / 256, 90 epochs
with 10 warm-up (epochs / 9 when --epochs is given alone), effective batch 16384 reached by
accumulating --batch-size forward passes; training images get MAE's RandomResizedCrop + flip.
grid: 104 heads (last 1 or 4 cls tokens, with or without the patch mean, 13 lrs, with or without
BN) on one frozen forward per batch; the head is picked on a validation split carved from the
training set and scored on the val split of --val. --cached trains on centre-crop features
extracted once: much faster, and labelled as a different protocol. Settings the data cannot
take (an effective batch beyond the training split, grid blocks beyond the encoder's depth, a
bad selection split) are refused, with the value that works, before any forward pass.
"""

from __future__ import annotations

import argparse
import sys

from mimkit.eval.common import add_eval_args, check_common_args, encoder_from_args, write_json
from mimkit.eval.linear_probe import PRESETS, format_linear_probe, linear_probe, preset_settings


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run :func:`~mimkit.eval.linear_probe.linear_probe`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_args(
        parser,
        batch_size=None,
        batch_size_help="images per forward pass: mae accumulates them up to --effective-batch (its "
        "BatchNorm sees one pass: 512), grid trains on them (1024, its lrs scale with it); feature "
        "extraction uses it too (256)",
    )
    parser.add_argument("--preset", choices=PRESETS, default="mae", help="protocol (%(default)s)")
    parser.add_argument("--cached", action="store_true", help="train on centre-crop features extracted once")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (mae 90, grid 10)")
    parser.add_argument("--warmup-epochs", type=float, default=None, help="mae: warm-up epochs (epochs / 9)")
    parser.add_argument("--effective-batch", type=int, default=None, help="mae: images per step (16384)")
    parser.add_argument("--blr", type=float, default=None, help="mae: base lr, lr = blr x batch / 256 (0.1)")
    parser.add_argument(
        "--epoch-length", type=int, default=None, help="grid: iterations per epoch (1250; 0 = one pass)"
    )
    parser.add_argument("--val-fraction", type=float, default=None, help="grid: carved selection split (0.1)")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    mae_only = {"warmup_epochs": args.warmup_epochs, "effective_batch": args.effective_batch, "blr": args.blr}
    grid_only = {"epoch_length": args.epoch_length, "val_fraction": args.val_fraction}
    given, other = (mae_only, grid_only) if args.preset == "mae" else (grid_only, mae_only)
    wrong = [f"--{k.replace('_', '-')}" for k, v in other.items() if v is not None]
    if wrong:
        parser.error(f"{', '.join(wrong)} do not apply to --preset {args.preset}")
    try:
        settings = preset_settings(
            args.preset, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, **given
        )
        encoder = encoder_from_args(args)
        res = linear_probe(
            encoder,
            args.train,
            args.val,
            preset=args.preset,
            cached=args.cached,
            settings=settings,
            extract=args.extract,  # --batch-size unset: 256 images per feature pass
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(format_linear_probe(res))
    if args.json is not None:
        print(f"wrote {write_json(args.json, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
