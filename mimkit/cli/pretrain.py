"""Pretrain a method from a recipe: ``mimkit pretrain RECIPE [section.key=value ...]``.

``python tools/pretrain.py`` runs the same from a checkout, and is the script the launchers take
(``torchrun -m mimkit.cli.pretrain`` works too). Examples::

    mimkit pretrain recipes/demo/mae_vit_tiny.yaml run.dir=runs/demo
    mimkit pretrain recipes/mae/vit_base_patch16_in1k.yaml train.max_steps=20 run.dir=runs/smoke
    torchrun --nproc_per_node 8 tools/pretrain.py recipes/mae/vit_base_patch16_in1k.yaml run.dir=runs/b
    deepspeed --hostfile hostfile tools/pretrain.py recipes/mae/vit_large_patch16_in1k.yaml run.dir=runs/l

``run.dir`` names the run directory and ``train.max_steps`` caps the steps of a smoke run.
Running the same command again resumes from the run directory's latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from mimkit.train import NonFiniteLossError, RecipeError, load_recipe, pretrain
from mimkit.train.distributed import world_size_from_env
from mimkit.train.trainer import BadDataError


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The recipe path, its overrides and the DeepSpeed launcher's ``--local_rank``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain a ViT with a self-supervised method, as a recipe describes.",
        epilog="Any recipe key can be overridden: optim.base_lr=1e-4 method.backbone.img_size=64 "
        "run.dir=runs/x train.max_steps=50 (values are YAML).",
    )
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/demo/mae_vit_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Load the recipe with its overrides and pretrain; 2 on a recipe error, 1 when training stops."""
    args = parse_args(argv, prog)
    rank = int(os.environ.get("RANK", "0"))
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=world_size_from_env())
        pretrain(recipe)
    except (RecipeError, NonFiniteLossError, BadDataError) as err:
        if rank == 0:
            kind = "recipe error" if isinstance(err, RecipeError) else "training stopped"
            print(f"pretrain: {kind}: {err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, RecipeError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
