"""Convert checkpoints between the official MAE / CAE repositories, timm and mimkit.

``mimkit convert`` / ``python tools/convert.py``:

    mimkit convert mae_pretrain_vit_base.pth out/mae_b --from mae
    mimkit convert mae_pretrain_vit_base_full.pth out/mae_full --from mae --keep-decoder
    mimkit convert cae_base_1600ep.pth out/cae_b --from cae
    mimkit convert vit_small.safetensors out/vit_s --from timm --img-size 384
    mimkit convert out/mae_b out/mae_b_timm --from mimkit          # export for timm

IN is a .pth/.pt (with or without a model / state_dict wrapper) or .safetensors file; for
--from mimkit an exported encoder (directory, encoder.safetensors or encoder.json). Files are
read with torch.load(weights_only=True) or safetensors, never by unpickling arbitrary objects.

OUT is a directory. --to mimkit (the default for mae, cae, timm) writes encoder.safetensors +
encoder.json (load_backbone reads them); with --keep-decoder also model.safetensors +
recipe.yaml (mimkit.train.load_method rebuilds the full MAE / CAE). --to timm (the default for
--from mimkit) writes timm.safetensors + timm.json, which names the timm model, its arguments
and the preprocessing. Every run writes convert.json (what was read and written, keys dropped).

The architecture is read from the tensors; heads cannot be, so they follow the preset of the
width (192: 3, 384: 6, 768: 12, 1024 and 1280: 16) unless --num-heads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mimkit.files import atomic_write_text
from mimkit.interop import SOURCES, TARGETS, convert_checkpoint


def _size(text: str) -> int | tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def format_report(report: dict) -> str:
    """The human table printed after a conversion."""
    enc = report["encoder"]
    rows = [
        ("source", f"{report['source']} {report['input']}"),
        ("written", ", ".join(Path(f).name for f in report["files"]) + f" in {report['output']}"),
        ("encoder", f"{enc['name']} depth {enc['depth']} width {enc['embed_dim']} heads {enc['num_heads']}"),
        (
            "image",
            f"{enc['img_size'][0]}x{enc['img_size'][1]} patch {enc['patch_size']} pos {enc['pos_embed']}",
        ),
        ("full model", report["full_model"]["name"] if report["full_model"] else "no"),
        ("dropped keys", str(len(report["dropped_keys"]))),
    ]
    rows += [("note", n) for n in report["notes"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), convert, print the report; 2 on a bad input."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="checkpoint file (or a mimkit export for --from mimkit)")
    parser.add_argument("output", type=Path, help="output directory")
    parser.add_argument(
        "--from", dest="source", required=True, choices=SOURCES, help="checkpoint layout of IN"
    )
    parser.add_argument("--to", choices=TARGETS, default=None, help="output format (default: see above)")
    parser.add_argument("--keep-decoder", action="store_true", help="mae/cae: also write the full model")
    parser.add_argument(
        "--num-heads", type=int, default=None, help="encoder heads (default: preset of the width)"
    )
    parser.add_argument(
        "--decoder-heads", type=int, default=None, help="decoder heads (default: MAE 16, CAE 12)"
    )
    parser.add_argument(
        "--img-size", type=_size, default=None, help="resample position tables to this size (H or HxW)"
    )
    parser.add_argument("--no-norm-pix", action="store_true", help="mae --keep-decoder: plain-pixel targets")
    parser.add_argument(
        "--keep-cae-layout", action="store_true", help="cae: keep CAE's row-first channels (no relabelling)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    options = {"keep_decoder": args.keep_decoder, "num_heads": args.num_heads, "img_size": args.img_size}
    if args.decoder_heads is not None:
        options["decoder_heads"] = args.decoder_heads
    if args.source == "mae":
        options["norm_pix_loss"] = not args.no_norm_pix
    if args.source == "cae":
        options["swap_pos_layout"] = not args.keep_cae_layout
    try:
        report = convert_checkpoint(args.input, args.output, args.source, to=args.to, **options)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
