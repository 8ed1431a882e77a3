"""In-context evaluation: dense retrieval segmentation (seg), classification (cls), prompting (prompt).

``mimkit incontext`` / ``python tools/incontext.py``:

    mimkit incontext seg --encoder runs/demo --train "synthetic:shapes?train=256&val=128" --vs-random
    mimkit incontext seg --encoder export/ --train voc:/data/VOCdevkit/VOC2012 --img-size 512 \\
        --memory-size 1024000 --aug-epochs 2 --json hbird_voc.json
    mimkit incontext seg --encoder export/ --train ade20k:/data/ADEChallengeData2016 --img-size 512
    mimkit incontext cls --encoder runs/demo --train "synthetic:shapes?train=2000&val=500"
    mimkit incontext prompt --run runs/painter --train "synthetic:shapes?train=4096&val=512" --vs-random

seg (Hummingbird, Balazevic et al. 2023): a memory bank of the train split's final-normed patch
tokens (L2-normalised keys) and per-class pixel fractions (values), over --aug-epochs passes of
random crops and flips, capped at --memory-size patches with --sampler (rare: rare classes first);
each val patch takes the softmax(cos / --temperature)-weighted values of its --k nearest keys;
the class distributions are upsampled bilinearly and argmaxed. Reported: mIoU (identity mapping,
primary; Hungarian-matched, as open-hummingbird-eval), per-class IoU, pixel accuracy. The memory
it will need is printed before it starts, and a bank that would not fit in the free memory (or
hold fewer patches than --k) is refused with the --memory-size that fits, before any forward
pass. --vs-random also runs a random init of the same shape and prints both side by side.

cls: n labelled train images per class (--shots) as the support; each val image is classified
by nearest prototype (CL2N) and by weighted k-NN over the support, over --episodes seeded draws;
mean and 95% interval. Shots beyond the smallest class are refused before any forward pass.

prompt: visual prompting by inpainting (Bar et al. 2022) with a whole pretrained method, decoder
included; the same tool and options as ``mimkit prompt`` (see ``incontext prompt --help``).
"""

from __future__ import annotations

import argparse
import os
import sys

from mimkit.eval.common import add_eval_args, check_common_args, encoder_from_args, write_json
from mimkit.eval.incontext import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    SAMPLERS,
    compare_incontext,
    format_segmentation,
    incontext_segmentation,
)
from mimkit.eval.incontext_cls import (
    CLS_K,
    EPISODES,
    format_classification,
    incontext_classification,
)
from mimkit.eval.knn import FEW_SHOT_N, KNN_FEATURES, KNN_TEMPERATURE
from mimkit.eval.retrieval import BACKENDS, KEY_DTYPES


def _memory_size(text: str) -> int | None:
    if text.lower() in ("none", "all", "unlimited"):
        return None
    value = int(float(text))  # accepts 1024000 and 1.024e6
    if value < 1:
        raise argparse.ArgumentTypeError(f"--memory-size {text} must be positive (or 'none' for every patch)")
    return value


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="task", required=True)
    seg = sub.add_parser("seg", help="dense nearest-neighbour retrieval segmentation (Hummingbird)")
    add_eval_args(seg, batch_size=64)
    seg.add_argument(
        "--memory-size", type=_memory_size, default=None, help="patch cap of the memory bank (default: none)"
    )
    seg.add_argument("--aug-epochs", type=int, default=1, help="passes over the train images (%(default)s)")
    seg.add_argument("--no-augment", action="store_true", help="memory from resized images, no crops/flips")
    seg.add_argument(
        "--sampler", choices=SAMPLERS, default="rare", help="patch choice under the cap (%(default)s)"
    )
    seg.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours per query patch (%(default)s)")
    seg.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature (%(default)s)"
    )
    seg.add_argument("--backend", choices=BACKENDS, default="torch", help="search backend (%(default)s)")
    seg.add_argument(
        "--key-dtype",
        choices=list(KEY_DTYPES),
        default=None,
        help="key dtype (default: fp16 on GPU, fp32 on CPU)",
    )
    seg.add_argument("--query-chunk", type=int, default=None, help="query patches per search block")
    seg.add_argument("--key-chunk", type=int, default=None, help="keys per search block")
    seg.add_argument("--vs-random", action="store_true", help="also evaluate a random init, side by side")

    cls = sub.add_parser("cls", help="in-context classification from n labelled images per class")
    add_eval_args(cls)
    cls.add_argument(
        "--shots", type=int, nargs="+", default=list(FEW_SHOT_N), help="support images per class"
    )
    cls.add_argument("--episodes", type=int, default=EPISODES, help="seeded support draws (%(default)s)")
    cls.add_argument(
        "--k", type=int, default=CLS_K, help="k-NN neighbours, at most the support (%(default)s)"
    )
    cls.add_argument("--temperature", type=float, default=KNN_TEMPERATURE, help="k-NN vote temperature")
    cls.add_argument("--feature", choices=KNN_FEATURES, default="cls", help="feature compared (%(default)s)")
    # parsed by mimkit.cli.prompt (main hands it the rest of the line); listed here for --help
    sub.add_parser(
        "prompt", help="visual prompting by inpainting (the options of `mimkit prompt`)", add_help=False
    )
    return parser


def _seg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    if args.cache_dir is not None:
        parser.error("--cache-dir does not apply to seg: the memory bank is rebuilt from augmented images")
    if args.vs_random and args.random_init:
        parser.error("--vs-random already evaluates the random init beside --encoder; drop --random-init")
    options = dict(
        memory_size=args.memory_size, aug_epochs=args.aug_epochs, augment=not args.no_augment,
        sampler=args.sampler, k=args.k, temperature=args.temperature, backend=args.backend,
        key_dtype=args.key_dtype, query_chunk=args.query_chunk, key_chunk=args.key_chunk,
        extract=args.extract,
    )  # fmt: skip
    if args.vs_random:
        return compare_incontext(
            args.encoder, args.train, args.val, checkpoint=args.checkpoint, seed=args.seed,
            normalization=args.normalization, **options,
        )  # fmt: skip
    encoder = encoder_from_args(args)
    res = incontext_segmentation(encoder, args.train, args.val, seed=args.seed, **options)
    print(format_segmentation(res))
    return res


def _cls(args: argparse.Namespace) -> dict:
    encoder = encoder_from_args(args)
    res = incontext_classification(
        encoder, args.train, args.val, shots=args.shots, episodes=args.episodes, k=args.k,
        temperature=args.temperature, feature=args.feature, seed=args.seed, extract=args.extract,
    )  # fmt: skip
    print(format_classification(res))
    return res


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the seg, cls or prompt task, print its table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prompt"]:
        from mimkit.cli import prompt

        return prompt.main(argv[1:], prog=f"{prog or os.path.basename(sys.argv[0])} prompt")
    parser = _parser(prog)
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    try:
        res = _seg(parser, args) if args.task == "seg" else _cls(args)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.json is not None:
        print(f"wrote {write_json(args.json, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
