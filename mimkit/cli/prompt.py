"""Visual prompting by inpainting: ``mimkit prompt`` / ``python tools/prompt.py``.

    mimkit prompt --run runs/painter --vs-random \\
        --train "synthetic:textures?size=64&train=4096&val=512&seed=0&cache=1&segmentation=1"
    mimkit prompt --run runs/mae_rawpix --train voc:/data/VOCdevkit/VOC2012 --task fg --shots 2 \\
        --selection nearest --seeds 0 1 2 --json prompt_voc.json --png prompt_voc.png

For each val query a 2x2 canvas at the model's input size: the support image and its label as a
fixed colour map on top, the query and a fully masked answer quadrant below (Bar et al. 2022,
thin white separators). The run's whole method (encoder and pixel decoder) paints the answer; the
painting, averaged over --shots canvases with different supports, is resized to the query's label
size and decoded by nearest palette colour (fg: threshold). fg: one class present in each query is
the foreground (Pascal-5i style), scored by foreground IoU; semantic: all classes, mIoU. Supports
come from the train split (--pool-size images), at random or nearest by the encoder's features.
A run trained with norm_pix_loss cannot paint absolute colours and is refused
(pretrain with method.norm_pix_loss=false). --vs-random adds the same method untrained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimkit.eval.common import default_device, write_json
from mimkit.eval.prompting import SELECTIONS, TASKS


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", required=True, help="pretraining run directory (recipe.yaml + model.safetensors)"
    )
    parser.add_argument(
        "--train", required=True, help="labelled segmentation source of the supports (train split)"
    )
    parser.add_argument("--val", default=None, help="source of the queries (val split; default: --train's)")
    parser.add_argument(
        "--task", choices=(*TASKS, "all"), default="all", help="fg, semantic or both (%(default)s)"
    )
    parser.add_argument("--shots", type=int, default=1, help="canvases per query, averaged (%(default)s)")
    parser.add_argument(
        "--selection", choices=SELECTIONS, default="random", help="support choice (%(default)s)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the draws (%(default)s)")
    parser.add_argument("--num-queries", type=int, default=None, help="first N val images (default: all)")
    parser.add_argument("--pool-size", type=int, default=1000, help="train images drawn as the support pool")
    parser.add_argument(
        "--label-size", type=int, default=None, help="score at this side (default: the canvas's)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="canvases per forward pass (%(default)s)")
    parser.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    parser.add_argument(
        "--random-init", action="store_true", help="evaluate the same method untrained instead"
    )
    parser.add_argument("--vs-random", action="store_true", help="also evaluate a random init, side by side")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument(
        "--png", type=Path, default=None, help="write example canvases with painted answers here"
    )
    parser.add_argument("--examples", type=int, default=4, help="example canvases per task in --png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv``, score the run at visual prompting, print the table (and write --json / --png)."""
    from mimkit.eval.prompting import compare_prompting, format_prompting, prompt_segmentation

    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.vs_random and args.random_init:
        parser.error("--vs-random already evaluates the random init beside --run; drop --random-init")
    if not Path(args.run).is_dir():
        parser.error(f"--run {args.run}: no such directory (expected a pretraining run directory)")
    options = dict(
        tasks=TASKS if args.task == "all" else (args.task,), shots=args.shots, selection=args.selection,
        seeds=tuple(args.seeds), num_queries=args.num_queries, pool_size=args.pool_size,
        label_size=args.label_size, batch_size=args.batch_size, device=args.device,
        examples=args.examples, progress=not args.no_progress,
    )  # fmt: skip
    try:
        if args.vs_random:
            res = compare_prompting(args.run, args.train, args.val, png=args.png, **options)
        else:
            res = prompt_segmentation(
                args.run, args.train, args.val, random_init=args.random_init, png=args.png, **options
            )
            print(format_prompting(res))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.png is not None:
        print(f"wrote {args.png}")
    if args.json is not None:
        print(f"wrote {write_json(args.json, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
