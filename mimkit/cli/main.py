"""The ``mimkit`` console script: ``mimkit COMMAND [ARGS ...]``, one command per tool.

``mimkit knn --encoder runs/demo --train ...`` runs what ``python tools/knn.py --encoder runs/demo
--train ...`` runs: the same ``main(argv)`` of :mod:`mimkit.cli.knn`. A command's module is
imported only when it runs, so ``mimkit --help`` lists them all without building anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    """A subcommand: the module under :mod:`mimkit.cli` holding its ``main`` and its help line."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "pretrain": Command("pretrain", "pretrain a method from a YAML recipe (resumes a run)"),
    "finetune": Command("finetune", "fine-tune an encoder into a classifier (MAE's protocol, same trainer)"),
    "knn": Command("knn", "weighted k-NN (DINO) and few-shot k-NN of a frozen encoder"),
    "linear-probe": Command("linear_probe", "linear probe: MAE's protocol or DINOv2's head grid"),
    "attentive-probe": Command("attentive_probe", "attentive probe (V-JEPA's) on frozen patch tokens"),
    "compare-random": Command("compare_random", "k-NN and a cached linear probe beside a random init"),
    "incontext": Command("incontext", "in-context segmentation (retrieval) and classification"),
    "prompt": Command("prompt", "visual prompting by inpainting: segmentation from painted canvases"),
    "convert": Command("convert", "convert checkpoints: official MAE / CAE, timm, mimkit"),
    "make-shards": Command("make_shards", "write a source as resumable webdataset tar shards"),
    "visualize": Command("visualize", "reconstructions, metric curves and mask pictures"),
    "seg-probe": Command("seg_probe", "linear segmentation probe (DINOv2's protocol) on frozen patch tokens"),
}


def _parser() -> argparse.ArgumentParser:
    from mimkit import __version__

    width = max(len(name) for name in COMMANDS) + 2
    table = "\n".join(f"  {name:<{width}}{command.help}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="mimkit",
        usage="%(prog)s [-h] [--version] COMMAND [ARGS ...]",
        description="Masked-image-modelling pretraining and evaluation of Vision Transformers.",
        epilog=f"commands:\n{table}\n\n'mimkit COMMAND --help' gives a command's arguments; "
        "python tools/<command>.py\n(with _ for -) runs the same from a checkout. Benchmarks: "
        "python tools/benchmark.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command's arguments")
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mimkit COMMAND ARGS...``: the command's own ``main(ARGS)``; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # Only the first word is mimkit's: the rest, options included, is the command's.
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else (None, [])
    if argv and name is None:
        parsed = parser.parse_args(argv)  # --help and --version exit here, unknown options fail
        name, rest = parsed.command, parsed.args
    if name is None:
        parser.error(f"a command is required; valid: {', '.join(COMMANDS)}")
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; valid: {', '.join(COMMANDS)}")
    module = importlib.import_module(f"mimkit.cli.{COMMANDS[name].module}")
    return module.main(rest, prog=f"mimkit {name}")


if __name__ == "__main__":
    sys.exit(main())
