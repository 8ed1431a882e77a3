"""What ``tools/finetune.py`` runs: check a fine-tune recipe on its data, train it, write ``finetune.json``.

:func:`finetune` is a thin layer over the trainer (:func:`mimkit.train.pretrain`): the recipe's
``method`` is ``finetune``, ``train.init_from`` names the pretrained encoder and ``eval`` the split
scored every epoch. Before anything is built, :func:`check_finetune` reads what the schema cannot
know: that the source has labels, no more classes than ``method.num_classes``, and an even micro
batch for Mixup. :func:`finetune_vs_random` runs the same recipe a second time from a random init
(``train.init_from=null``, in ``RUN-random``), the floor a fine-tune is read against.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from mimkit.files import atomic_write_text
from mimkit.train import Recipe, RecipeError, pretrain
from mimkit.train.config import from_dict

RESULT_FILE = "finetune.json"
RANDOM_SUFFIX = "-random"


def check_finetune(recipe: Recipe) -> None:
    """Raise a RecipeError naming the key when ``recipe`` cannot fine-tune on its data."""
    from mimkit.data import build_source
    from mimkit.ssl import method_options

    m = recipe.method
    if m.name != "finetune":
        raise RecipeError(
            f"method.name must be finetune to fine-tune, got {m.name!r} (tools/pretrain.py trains {m.name!r})"
        )
    options = {**method_options("finetune"), **m.options}  # the constructor's defaults under the recipe's
    mixing = (options["mixup"] > 0 or options["cutmix"] > 0) and options["mixup_prob"] > 0
    if mixing and recipe.batch.micro_size % 2:
        raise RecipeError(
            f"batch.micro_size={recipe.batch.micro_size} must be even: Mixup/CutMix pair each micro-batch "
            "with its reverse (or set method.mixup=0 method.cutmix=0)"
        )
    num_classes = options["num_classes"]
    e = recipe.eval
    splits = [("data.source", recipe.data.source, recipe.data.split)]
    if e.split is not None:
        splits.append(("eval.source" if e.source else "data.source", e.source or recipe.data.source, e.split))
    for key, uri, split in splits:
        try:
            dataset = build_source(uri, split, None)
        except ValueError as err:
            raise RecipeError(f"{key} {uri!r} ({split} split): {err}") from None
        names = getattr(dataset, "class_names", None)
        if not isinstance(dataset, IterableDataset):
            if len(dataset) == 0:
                raise RecipeError(f"{key} {uri!r} has no images in its {split} split")
            if "label" not in dataset[0]:
                raise RecipeError(
                    f"{key} {uri!r} ({split} split) has no labels; fine-tuning needs class folders "
                    "(folder:PATH with PATH/<split>/<class>/<image>) or a labelled synthetic set"
                )
        if names is not None and len(names) > num_classes:
            raise RecipeError(
                f"method.num_classes={num_classes} but {key} {uri!r} has {len(names)} classes "
                f"({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''}); "
                f"set method.num_classes={len(names)}"
            )
    if recipe.train.init_from is None and _is_main():
        print(
            "[mimkit] train.init_from is null: fine-tuning starts from a random init "
            "(set train.init_from=PATH to an exported encoder or run directory)",
            file=sys.stderr,
        )


def evaluations(run_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The evaluation records of a run's ``metrics.jsonl`` (those holding ``<split>_top1``)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if f"{split}_top1" in record:
            records.append(record)
    return records


def finetune(recipe: Recipe) -> dict[str, Any]:
    """Fine-tune (or resume) the run ``recipe`` describes; returns what ``RUN/finetune.json`` holds.

    Every rank of the job calls this; rank 0 writes the file. The result holds the last and best
    evaluations (``top1``/``top5`` in %, ``loss``), the step each was made at, and where the
    encoder came from.
    """
    check_finetune(recipe)
    start = time.time()
    run = pretrain(recipe, task="finetune")
    split = recipe.eval.split
    evals = evaluations(run.run_dir, split) if split else []
    strip = len(split) + 1 if split else 0

    def scores(record: dict | None) -> dict[str, Any] | None:
        if record is None:
            return None
        values = {k[strip:]: v for k, v in record.items() if split and k.startswith(f"{split}_")}
        return {"step": record["step"], "epoch": record["epoch"], **values}

    best_record = None
    if run.best is not None:
        best_record = next((r for r in evals if r["step"] == run.best["step"]), None)
    result = {
        "tool": "finetune",
        "run_dir": str(run.run_dir),
        "init_from": recipe.train.init_from,
        "random_init": recipe.train.init_from is None,
        "method": recipe.method.to_dict(),
        "data": {"source": recipe.data.source, "eval_source": recipe.eval.source, "eval_split": split},
        "steps": run.steps,
        "last": scores(evals[-1] if evals else None),
        "best": scores(best_record),
        "best_metric": recipe.eval.best_metric,
        "best_dir": str(run.best["dir"]) if run.best else None,
        "classifier": str(run.run_dir / "classifier.safetensors"),
        "evaluations": [scores(r) for r in evals],
        "wall_time_s": round(time.time() - start, 1),
    }
    if _is_main():
        atomic_write_text(run.run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def random_init_recipe(recipe: Recipe) -> Recipe:
    """The same recipe from a random init, in ``RUN-random`` beside the run."""
    raw = recipe.to_dict()
    raw["train"]["init_from"] = None
    raw["run"]["dir"] = str(recipe.run.dir).rstrip("/") + RANDOM_SUFFIX
    return from_dict(raw, world_size=recipe.world_size)


def finetune_vs_random(recipe: Recipe) -> dict[str, Any]:
    """:func:`finetune` of ``recipe``, then of :func:`random_init_recipe`; both results side by side."""
    if recipe.train.init_from is None:
        raise RecipeError("--vs-random compares against train.init_from, which is null; set it to an encoder")
    pretrained = finetune(recipe)
    random_init = finetune(random_init_recipe(recipe))
    return {"tool": "finetune", "pretrained": pretrained, "random_init": random_init}


def result_table(results: dict[str, dict[str, Any]]) -> str:
    """Runs side by side: best and last top-1/top-5, the last loss, the step of the best, the run."""
    header = (
        f"{'':<13}{'best top1':>10}{'best top5':>10}{'last top1':>10}{'last top5':>10}{'at step':>9}  run"
    )
    lines = [header]
    for name, r in results.items():
        best, last = r.get("best") or {}, r.get("last") or {}

        def cell(d: dict, key: str) -> str:
            return f"{d[key]:>10.2f}" if key in d else f"{'-':>10}"

        step = f"{best['step']:>9}" if best else f"{'-':>9}"
        row = f"{name:<13}{cell(best, 'top1')}{cell(best, 'top5')}{cell(last, 'top1')}{cell(last, 'top5')}"
        lines.append(f"{row}{step}  {r['run_dir']}")
    return "\n".join(lines)


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
