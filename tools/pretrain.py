"""Pretrain a method from a recipe: ``python tools/pretrain.py RECIPE [section.key=value ...]``.

Examples::

    python tools/pretrain.py recipes/demo/mae_vit_tiny.yaml run.dir=runs/demo
    python tools/pretrain.py recipes/mae/vit_base_patch16_in1k.yaml train.max_steps=20 run.dir=runs/smoke
    torchrun --nproc_per_node 8 tools/pretrain.py recipes/mae/vit_base_patch16_in1k.yaml run.dir=runs/b
    deepspeed --hostfile hostfile tools/pretrain.py recipes/mae/vit_large_patch16_in1k.yaml run.dir=runs/l

``run.dir`` names the run directory and ``train.max_steps`` caps the steps of a smoke run.
Running the same command again resumes from the run directory's latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimkit.train import NonFiniteLossError, RecipeError, load_recipe, pretrain  # noqa: E402
from mimkit.train.distributed import world_size_from_env  # noqa: E402
from mimkit.train.trainer import BadDataError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
