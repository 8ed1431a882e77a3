"""Pictures of a pretraining run: ``mimkit visualize`` / ``python tools/visualize.py``.

    mimkit visualize recon RUN_DIR [--num 8] [--seed 0] [--out PATH]
    mimkit visualize curves RUN_DIR [RUN_DIR ...] [--out PATH]
    mimkit visualize masks [--type colornoise --color green] [--ratio 0.75] [--out PATH]

``recon`` draws original / masked input / reconstruction / reconstruction pasted into the
visible patches for validation images of the run's own data source; ``curves`` plots every
metric of ``metrics.jsonl`` against the step, overlaying several runs when given several (one
line each, named by the run directory). Both write a PNG into the run directory by default
(``curves.png`` in the current directory for several runs).
``masks`` needs no run: it draws sample masks of every ColorMAE colour next to random and block
masks (or of the one ``--type``/``--color`` chosen, next to those two) with their power
spectra, into ``masks.png`` by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mimkit.ssl import masking
from mimkit.visualize import (
    default_mask_kinds,
    plot_curves,
    plot_masks,
    recon_images,
    reconstruct,
    save_recon_grid,
)


def recon(run_dir: Path, num: int, seed: int, out: Path | None) -> Path:
    from mimkit.train import load_method, load_recipe

    method = load_method(run_dir).eval()
    recipe = load_recipe(run_dir / "recipe.yaml", check_data=False)
    img_size = method.encoder.config["img_size"][0]
    norm = recipe.normalization  # the run's own (data.mean / std: auto were resolved into recipe.yaml)
    images = recon_images(recipe.data.source, img_size, norm, num)
    mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
    pictures = reconstruct(method, images, mean, std, seed=seed)
    return save_recon_grid(pictures, out or run_dir / "reconstructions.png")


def mask_kinds(kind: str | None, color: str | None, ratio: float) -> dict[str, dict]:
    """All default kinds, or the chosen one followed by random and block masks for reference."""
    if kind is None and color is None:
        return default_mask_kinds(ratio)
    cfg = {"type": kind or "colornoise", "ratio": ratio}
    if color is not None:
        cfg["color"] = color
    label = f"{cfg['type']} {color}" if color else cfg["type"]
    kinds = {label: cfg}
    for reference in ("random", "block"):
        if reference != cfg["type"]:
            kinds[reference] = {"type": reference, "ratio": ratio}
    return kinds


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), draw the picture asked for, print its path."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["recon", "curves", "masks"])
    parser.add_argument(
        "run_dirs",
        type=Path,
        nargs="*",
        metavar="RUN_DIR",
        help="run directory; curves: one or more",
    )
    parser.add_argument("--num", type=int, default=8, help="validation images to reconstruct / masks per row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks drawn")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: in RUN_DIR, or masks.png)")
    parser.add_argument("--type", default=None, help="masks: one mask type to draw (default: all colours)")
    parser.add_argument("--color", default=None, help="masks: noise colour of a colornoise mask")
    parser.add_argument("--ratio", type=float, default=0.75, help="masks: mask ratio")
    parser.add_argument("--grid", type=int, default=14, help="masks: patches per side")
    args = parser.parse_args(argv)
    if args.what == "masks":
        if args.run_dirs:
            parser.error("masks takes no RUN_DIR")
        if args.type is not None and args.type not in masking.list_masks():
            parser.error(f"unknown mask type {args.type!r}; valid: {', '.join(masking.list_masks())}")
        if args.color is not None and args.type not in (None, "colornoise"):
            parser.error(f"--color is an option of colornoise masks, not of {args.type!r}")
        kinds = mask_kinds(args.type, args.color, args.ratio)
        try:
            path = plot_masks(
                args.out or Path("masks.png"), kinds, (args.grid, args.grid), args.num, args.seed
            )
        except ValueError as err:
            parser.error(str(err))
        print(f"wrote {path}")
        return 0
    if not args.run_dirs:
        parser.error(f"{args.what} needs a RUN_DIR")
    if args.what == "recon" and len(args.run_dirs) > 1:
        parser.error("recon draws one run; give one RUN_DIR")
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            parser.error(f"run directory {run_dir} does not exist")
    if args.what == "recon":
        path = recon(args.run_dirs[0], args.num, args.seed, args.out)
    else:
        metrics = [run_dir / "metrics.jsonl" for run_dir in args.run_dirs]
        for m in metrics:
            if not m.is_file():
                parser.error(f"{m} not found; is {m.parent} a run directory?")
        default = args.run_dirs[0] / "curves.png" if len(metrics) == 1 else Path("curves.png")
        labels = _labels(args.run_dirs)
        try:
            path = plot_curves(metrics, args.out or default, labels)
        except ValueError as err:
            parser.error(str(err))
    print(f"wrote {path}")
    return 0


def _labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its path where two runs share a name."""
    names = [d.name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


if __name__ == "__main__":
    sys.exit(main())
