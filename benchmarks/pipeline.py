"""``python tools/benchmark.py pipeline RECIPE``: end-to-end pretraining images/s, real data vs pre-decoded.

For each DataLoader worker count the recipe is trained twice for ``--steps`` optimizer steps through
the real path, :func:`mimkit.train.trainer.pretrain` (DeepSpeed engine, loader, sampler, logging),
in this process and in a temporary run directory:

- **real**: the recipe's own ``data.source`` (folder of JPEGs, ``wds:`` shards, ``synthetic:``),
  decoded and augmented on the fly;
- **pre-decoded**: the same run with ``data.source = predecoded:KEY``, a source that serves
  ``--predecoded-samples`` samples of the real source, decoded and augmented once beforehand and held
  in memory (sample ``i`` is stored sample ``i mod N``, with the real source's length, so the epoch
  arithmetic and the trainer path are unchanged; only the decoding is gone).

Images/s comes from the run's ``metrics.jsonl`` (one ``images_per_s`` per ``run.log_every`` steps)
with the first window dropped, so start-up (engine, worker processes, first batches) does not count:
the kept windows' images over their summed time. ``ratio = real / pre-decoded`` and
``data_share = 1 - ratio`` is the share of the real run's time lost to data loading (negative
values are noise). Issue #12's target: ratio >= 0.9 with the recipe's default worker count.

The ``predecoded:`` scheme is registered when this module is imported (only the benchmark imports
it) and resolves only keys that :func:`predecode` put in this process's store.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from benchmarks.common import machine_info, print_table
from mimkit.data import build_source, build_transform, register_scheme

SCHEME = "predecoded"
_STORE: dict[str, PredecodedSource] = {}
_KEYS = itertools.count()


class PredecodedSource(Dataset):
    """Samples decoded and augmented once, served from memory: item ``i`` is stored sample ``i % N``.

    Args:
        samples: the stored sample dicts (equal keys and shapes, as a source yields them).
        length: the length reported to the trainer (the real source's, so epochs are as long).
    """

    def __init__(self, samples: list[dict[str, torch.Tensor]], length: int):
        if not samples:
            raise ValueError("a pre-decoded source needs at least one sample")
        self.tensors = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
        self.stored, self.length = len(samples), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = index % self.stored
        return {k: v[i] for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


@register_scheme(SCHEME)
def _predecoded(spec: str, split: str, transform) -> Dataset:
    # the stored samples are already transformed; split and transform were applied when they were made
    if spec not in _STORE:
        known = ", ".join(f"{SCHEME}:{k}" for k in _STORE) or "none"
        raise ValueError(
            f"no pre-decoded samples under {SCHEME}:{spec}; this source exists only inside "
            f"`tools/benchmark.py pipeline` (made by benchmarks.pipeline.predecode); held now: {known}"
        )
    return _STORE[spec]


def predecode(source: str, split: str, transform: str, img_size: int, samples: int, seed: int = 0) -> str:
    """Decode and augment ``samples`` samples of ``source`` once; returns the ``predecoded:KEY`` URI."""
    dataset = build_source(source, split, build_transform(transform, img_size))
    length = len(dataset)
    count = min(samples, length)
    if isinstance(dataset, IterableDataset):
        dataset.configure(seed=seed, resample=True, samples=count, batch=1)
        stored = [s for _, s in zip(range(count), dataset)]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stored = [dataset[i] for i in range(count)]
    key = f"{source.partition(':')[0]}-{next(_KEYS)}"  # e.g. predecoded:folder-0
    _STORE[key] = PredecodedSource(stored, length)
    return f"{SCHEME}:{key}"


def release(uri: str) -> None:
    """Drop a store entry made by :func:`predecode`."""
    _STORE.pop(uri.partition(":")[2], None)


def steady_images_per_s(metrics: list[dict[str, Any]], global_batch: int) -> tuple[float, int]:
    """Images/s over every logged window but the first, and the steps it covers.

    Each line of ``metrics.jsonl`` holds the speed of the steps since the line before; the windows'
    images are summed over their summed seconds (not a mean of speeds, which overweights short ones).
    """
    if len(metrics) < 2:
        raise ValueError(
            f"{len(metrics)} logged window(s); need 2 or more to drop the first: raise --steps "
            "or lower --log-every"
        )
    images = seconds = 0.0
    steps = 0
    for before, line in zip(metrics, metrics[1:]):
        window_images = (line["step"] - before["step"]) * global_batch
        images += window_images
        seconds += window_images / line["images_per_s"]
        steps += line["step"] - before["step"]
    return images / seconds, steps


def train_images_per_s(
    recipe_path: str,
    overrides: list[str],
    source: str,
    workers: int,
    steps: int,
    log_every: int,
) -> dict[str, Any]:
    """Pretrain ``steps`` steps with ``source`` and ``workers`` in a temporary run dir; its steady speed."""
    from mimkit.train import load_recipe, pretrain

    with tempfile.TemporaryDirectory(prefix="mimkit-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        ours = [
            f"data.source={source}",
            f"data.workers={workers}",
            f"train.max_steps={steps}",
            f"run.dir={run_dir}",
            f"run.log_every={log_every}",
            "run.checkpoint_every=0",  # one checkpoint, after the last logged step
            "run.progress=false",
            "run.monitor=null",  # the training loop's rate, without the demos' monitor and pictures
            "run.images_every=0",
        ]
        recipe = load_recipe(recipe_path, [*overrides, *ours])
        t0 = time.perf_counter()
        # the process group stays up between runs: DeepSpeed keeps its groups for the process's life
        with contextlib.redirect_stdout(io.StringIO()):  # the run's summary; the table is ours
            result = pretrain(recipe)
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if result.steps < steps:
        raise ValueError(f"the run stopped after {result.steps} steps (its whole schedule), not {steps}")
    speed, timed = steady_images_per_s(metrics, recipe.batch.global_size)
    return {
        "images_per_s": speed,
        "windows": [m["images_per_s"] for m in metrics[1:]],  # the kept windows, to see the spread
        "timed_steps": timed,
        "wall_s": wall,
        "load_1m_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "final_loss": result.final_loss,
    }


def benchmark_pipeline(
    recipe_path: str,
    workers: list[int] | None = None,
    steps: int = 20,
    log_every: int = 5,
    overrides: list[str] | tuple[str, ...] = (),
    predecoded_samples: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Real vs pre-decoded images/s per worker count; see the module docstring.

    ``workers=None`` times 0, 1, 2 and the recipe's own count. Returns ``{"recipe", "source",
    "recipe_workers", "global_batch", "predecoded", "results": [row per worker count]}``.
    """
    from tqdm import tqdm

    from mimkit.train import load_recipe

    if steps < 2 * log_every or log_every < 1:
        raise ValueError(
            f"--steps={steps} must be at least twice --log-every={log_every} (>= 1): the first logged "
            "window is start-up and is dropped"
        )
    if predecoded_samples < 1:
        raise ValueError(f"--predecoded-samples must be positive, got {predecoded_samples}")
    recipe = load_recipe(recipe_path, list(overrides))
    default = recipe.data.workers
    counts = sorted(set(workers if workers is not None else [0, 1, 2, default]))
    if counts[0] < 0:
        raise ValueError(f"worker counts must be >= 0, got {counts}")
    t0 = time.perf_counter()
    predecoded = predecode(
        recipe.data.source, recipe.data.split, recipe.data.transform, recipe.img_size, predecoded_samples
    )
    store = _STORE[predecoded.partition(":")[2]]
    info = {
        "uri": predecoded,
        "samples": store.stored,
        "bytes": store.nbytes,
        "seconds": time.perf_counter() - t0,
    }
    rows = []
    runs = [(w, kind) for w in counts for kind in ("real", "predecoded")]
    try:
        bar = tqdm(runs, desc="benchmark pipeline", unit="run", disable=not progress)
        for w, kind in bar:
            bar.set_postfix(workers=w, data=kind, refresh=True)
            out = train_images_per_s(
                recipe_path,
                list(overrides),
                recipe.data.source if kind == "real" else predecoded,
                w,
                steps,
                log_every,
            )
            if kind == "real":
                row = {"workers": w, "default": w == default}
            for key in ("images_per_s", "windows", "wall_s", "load_1m_after"):
                row[f"{kind}_{key}"] = out[key]
            if kind == "predecoded":
                row["ratio"] = row["real_images_per_s"] / row["predecoded_images_per_s"]
                row["data_share"] = 1.0 - row["ratio"]
                row["timed_steps"] = out["timed_steps"]
                rows.append(row)
    finally:
        release(predecoded)
    return {
        "recipe": str(recipe_path),
        "source": recipe.data.source,
        "recipe_workers": default,
        "global_batch": recipe.batch.global_size,
        "micro_batch": recipe.batch.micro_size,
        "img_size": recipe.img_size,
        "predecoded": info,
        "results": rows,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    """The ``pipeline`` options."""
    parser.add_argument("recipe", help="a pretraining recipe, e.g. recipes/demo/mae_vit_tiny.yaml")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="DataLoader worker counts (default 0 1 2 and the recipe's)"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument(
        "--log-every", type=int, default=5, help="steps per logged window; the first is dropped (5)"
    )
    parser.add_argument(
        "--predecoded-samples",
        type=int,
        default=256,
        help="distinct samples decoded once for the pre-decoded runs (default 256)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides, e.g. batch.global_size=32 train.precision=fp32",
    )


def run(args: argparse.Namespace) -> dict:
    """``pipeline``: a table and the result dict (options, machine, one row per worker count)."""
    from mimkit.train.config import RecipeError

    machine = machine_info()
    try:
        res = benchmark_pipeline(
            args.recipe, args.workers, args.steps, args.log_every, args.set, args.predecoded_samples,
            progress=not args.no_progress,
        )  # fmt: skip
    except RecipeError as err:  # a ValueError already; named so the message says where it came from
        raise ValueError(f"recipe: {err}") from None
    rows = [{**r, "default": "*" if r["default"] else ""} for r in res["results"]]
    print(f"{res['recipe']}: {res['source']}, global batch {res['global_batch']}, img {res['img_size']}")
    print_table(
        rows, ["workers", "default", "real_images_per_s", "predecoded_images_per_s", "ratio", "data_share"]
    )
    options = {k: getattr(args, k) for k in ("steps", "log_every", "predecoded_samples", "set")}
    return {"benchmark": "pipeline", "options": options, "machine": machine, **res}
