"""Fine-tune an encoder into a classifier: ``mimkit finetune RECIPE [section.key=value ...]``.

``python tools/finetune.py`` runs the same from a checkout, and is the script the launchers take.
The trainer is the pretraining one (DeepSpeed, resume, ZeRO, bf16, kill-safe checkpoints), so the
recipe and its overrides work as for ``mimkit pretrain``. Examples::

    python tools/pretrain.py recipes/demo/mae_vit_tiny.yaml run.dir=runs/demo
    mimkit finetune recipes/finetune/demo_vit_tiny.yaml --encoder runs/demo run.dir=runs/demo-ft --vs-random
    torchrun --nproc_per_node 8 tools/finetune.py recipes/finetune/vit_base_patch16_in1k.yaml \\
        train.init_from=runs/mae_b run.dir=runs/ft_b

``--encoder PATH`` is ``train.init_from=PATH``: an export or run directory, ``encoder.safetensors``, or
a timm-keyed checkpoint (official MAE weights, or a ``tools/convert.py`` export). Every epoch the
``eval.split`` is scored (top-1/top-5 into ``metrics.jsonl``); the run ends with the last and best
(``RUN/best``) exports, the classifier as timm loads it (``classifier.safetensors`` + ``.json``) and
``RUN/finetune.json``. ``--vs-random`` trains the same recipe from a random init in ``RUN-random``
and prints both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mimkit.files import atomic_write_text
from mimkit.train import NonFiniteLossError, RecipeError, load_recipe
from mimkit.train.distributed import world_size_from_env
from mimkit.train.trainer import BadDataError


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a pretrained encoder into a classifier (MAE's protocol) as a recipe says.",
        epilog="Any recipe key can be overridden: train.init_from=runs/demo optim.layer_decay=0.75 "
        "run.dir=runs/x train.max_steps=50 (values are YAML).",
    )
    parser.add_argument("recipe", help="a fine-tune recipe, e.g. recipes/finetune/demo_vit_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--encoder", help="the pretrained encoder: the same as train.init_from=PATH")
    parser.add_argument(
        "--vs-random",
        action="store_true",
        help="also fine-tune the same recipe from a random init (in RUN-random) and print both",
    )
    parser.add_argument("--json", help="also write the result (both runs with --vs-random) to this path")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Check the recipe on its data and fine-tune; 2 on a recipe error, 1 when training stops."""
    from mimkit.finetune.run import finetune, finetune_vs_random, result_table

    args = parse_args(argv, prog)
    rank = int(os.environ.get("RANK", "0"))
    overrides = list(args.overrides) + ([f"train.init_from={args.encoder}"] if args.encoder else [])
    try:
        recipe = load_recipe(args.recipe, overrides, world_size=world_size_from_env())
        if args.vs_random:
            result = finetune_vs_random(recipe)
            rows = {"pretrained": result["pretrained"], "random init": result["random_init"]}
        else:
            result = finetune(recipe)
            rows = {"pretrained" if recipe.train.init_from else "random init": result}
    except (RecipeError, NonFiniteLossError, BadDataError) as err:
        if rank == 0:
            kind = "recipe error" if isinstance(err, RecipeError) else "training stopped"
            print(f"finetune: {kind}: {err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, RecipeError) else 1
    if rank == 0:
        split = recipe.eval.split or "eval"
        print(f"\nfine-tune results on the {split} split (top-1/top-5 %):\n{result_table(rows)}", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
