"""``python tools/benchmark.py incontext``: in-context retrieval queries/s against memory size,
and with ``--prompt`` visual-prompting canvases/s.

Retrieval (:func:`benchmark_incontext`): random unit keys of ``--dim`` dimensions and random
class-fraction values, ``--queries`` query patches searched exactly (chunked matmul + top-k) and
aggregated as the dense retrieval evaluation does; the best of ``--repeat`` timed runs after a
warm-up counts. The default sizes span 10k to 1M keys on one machine.

Prompting (:class:`PromptSetup`): per recipe, an untrained method of that recipe (speed does
not depend on the weights) paints ``--canvases`` canvases the way ``mimkit prompt`` does per batch
(labels rendered, cells resized and stitched, the answer quadrant painted, cropped, resized to the
label size and decoded), against the same model's encoder-plus-decoder forward on ready canvases
with the same mask: ``ratio`` near 1 means painting costs one forward and nothing else. Against
the raw-pixel MAE: ``forward_cost_vs_mae_forward`` (the model's forward against MAE's encoder
plus decoder), ``cost_vs_mae_path`` (the tool's path against MAE's) and ``cost_vs_mae_forward``
(the tool's path against MAE's bare forward). The ``--repeat`` timed passes of every recipe and
path are interleaved, and the best of each counts.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, print_table
from mimkit.eval.incontext import DEFAULT_K, DEFAULT_TEMPERATURE, MemoryBank, patch_distributions
from mimkit.eval.retrieval import KEY_DTYPES, default_key_dtype

PROMPT_RECIPES = ["recipes/demo/painter_vit_tiny.yaml", "recipes/demo/mae_rawpix_vit_tiny.yaml"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """The ``incontext`` options."""

    parser.add_argument(
        "--memory-sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="patches in the memory bank (default 10000 100000 1000000)",
    )
    parser.add_argument("--dim", type=int, default=192, help="key dimension (default 192, ViT-Ti)")
    parser.add_argument("--queries", type=int, default=4096, help="query patches per timed run (4096)")
    parser.add_argument("--classes", type=int, default=21, help="classes in the values (default 21, VOC)")
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"neighbours per query (default {DEFAULT_K})"
    )
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature (0.02)"
    )
    parser.add_argument(
        "--key-dtype", choices=list(KEY_DTYPES), help="key storage dtype (default fp16 on GPU, fp32 on CPU)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per size; the best counts (3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random keys (default 0)")
    parser.add_argument(
        "--prompt", action="store_true", help="time visual prompting (canvases/s) instead of retrieval"
    )
    parser.add_argument(
        "--recipes", nargs="+", default=PROMPT_RECIPES, help="--prompt: methods timed (the two CPU demos)"
    )
    parser.add_argument("--canvases", type=int, default=256, help="--prompt: canvases per timed run (256)")
    parser.add_argument("--batch-size", type=int, default=64, help="--prompt: canvases per forward (64)")


def _check(args: argparse.Namespace) -> torch.device:
    for name in ("memory_sizes", "dim", "queries", "classes", "k", "repeat"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {values}")
    if args.k > min(args.memory_sizes):
        raise ValueError(f"--k={args.k} exceeds the smallest memory size {min(args.memory_sizes)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"bad --device {args.device!r}: {err}; valid: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r} is not supported; valid: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} asked for, but this machine has no CUDA device; use cpu")
    return device


def run(args: argparse.Namespace) -> dict:
    """``incontext``: a table and the result dict (options, machine, one row per memory size)."""
    from tqdm import tqdm

    device = _check(args)
    if args.prompt:
        return _run_prompt(args, device)
    machine = machine_info()
    rows = []
    # one call per size (keys made at that size) so the bar moves; peak memory is the largest size's
    for size in tqdm(sorted(set(args.memory_sizes)), desc="benchmark incontext", disable=args.no_progress):
        (row,) = benchmark_incontext(
            (size,),
            dim=args.dim,
            num_classes=args.classes,
            num_queries=args.queries,
            k=args.k,
            temperature=args.temperature,
            key_dtype=args.key_dtype,
            device=device,
            repeats=args.repeat,
            seed=args.seed,
        )
        rows.append(row)
    print_table(
        rows, ["memory_size", "dim", "num_queries", "k", "key_dtype", "device", "seconds", "queries_per_s"]
    )
    options = {
        k: getattr(args, k)
        for k in (
            "memory_sizes",
            "dim",
            "queries",
            "classes",
            "k",
            "temperature",
            "key_dtype",
            "device",
            "repeat",
        )
    }
    options["seed"] = args.seed
    return {"benchmark": "incontext", "options": options, "machine": machine, "results": rows}


def best_seconds(run, repeats: int, device: torch.device) -> float:
    """The shortest of ``repeats`` timed calls of ``run()`` (CUDA work synchronised around each)."""
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def benchmark_incontext(
    memory_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
    *,
    dim: int = 192,
    num_classes: int = 21,
    num_queries: int = 4096,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    key_dtype: str | None = None,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    seed: int = 0,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
) -> list[dict[str, Any]]:
    """Query patches per second of retrieval + aggregation against memory size, on random unit vectors.

    Each size is timed ``repeats`` times after one warm-up; the best time counts. Returns one dict
    per size: ``memory_size, dim, num_queries, k, key_dtype, device, seconds, queries_per_s``.
    """
    device = torch.device(device)
    key_dtype = key_dtype or default_key_dtype(device)
    # drawn where they are used: 10M x 768 keys from a CPU generator take minutes to make and copy
    g = torch.Generator(device).manual_seed(seed)
    largest = max(memory_sizes)
    keys = torch.empty(largest, dim, dtype=KEY_DTYPES[key_dtype], device=device)
    for i in range(0, largest, 1 << 18):  # fill in slices: no full fp32 temporary
        rows = torch.randn(min(1 << 18, largest - i), dim, generator=g, device=device)
        keys[i : i + len(rows)] = F.normalize(rows, dim=1).to(keys.dtype)
    values = torch.rand(largest, num_classes, generator=g, device=device).half()
    queries = F.normalize(torch.randn(num_queries, dim, generator=g, device=device), dim=1)
    out = []
    for size in sorted(memory_sizes):
        memory = MemoryBank(keys[:size], values[:size])
        call = dict(k=k, temperature=temperature, query_chunk=query_chunk, key_chunk=key_chunk)
        patch_distributions(queries[: min(256, num_queries)], memory, **call)  # warm-up
        best = best_seconds(functools.partial(patch_distributions, queries, memory, **call), repeats, device)
        out.append(
            {
                "memory_size": size, "dim": dim, "num_queries": num_queries, "k": k, "key_dtype": key_dtype,
                "device": str(device), "seconds": best, "queries_per_s": num_queries / best,
            }
        )  # fmt: skip
    return out


def _run_prompt(args: argparse.Namespace, device: torch.device) -> dict:
    for name in ("canvases", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    missing = [r for r in args.recipes if not Path(r).is_file()]
    if missing:
        raise FileNotFoundError(f"--recipes: no such file {', '.join(missing)}")
    machine = machine_info()
    sizes = {"num_canvases": args.canvases, "batch_size": args.batch_size}
    setups = [PromptSetup(recipe, **sizes, device=device, seed=args.seed) for recipe in args.recipes]
    # interleaved rounds, best of each: a machine's drift (frequency, neighbours) then reaches every
    # method and both paths alike instead of whichever was timed last
    for _ in range(args.repeat):
        for setup in setups:
            setup.time_once()
    rows = [setup.result() for setup in setups]
    mae = next((r for r in rows if r["method"] == "mae"), None)
    for row in rows:  # the target: painting with any method costs no more than one MAE forward
        row.update(_costs_vs_mae(row, mae))
    print_table(
        rows,
        ["recipe", "method", "side", "grid", "canvases_per_s", "forward_canvases_per_s", "ratio",
         "forward_cost_vs_mae_forward", "cost_vs_mae_path", "cost_vs_mae_forward"],
    )  # fmt: skip
    options = {"recipes": args.recipes, "canvases": args.canvases, "batch_size": args.batch_size}
    options.update(device=str(device), repeat=args.repeat, seed=args.seed)
    return {"benchmark": "incontext --prompt", "options": options, "machine": machine, "results": rows}


def _costs_vs_mae(row: dict[str, Any], mae: dict[str, Any] | None) -> dict[str, float | None]:
    """A method's time per canvas over MAE's: model against model (``forward_cost_vs_mae_forward``),
    tool path against tool path (``cost_vs_mae_path``), and its whole path against MAE's bare
    forward (``cost_vs_mae_forward``, the strictest: the path's rendering and decoding on one side only)."""
    if mae is None:
        return dict.fromkeys(("forward_cost_vs_mae_forward", "cost_vs_mae_path", "cost_vs_mae_forward"))
    return {
        "forward_cost_vs_mae_forward": mae["forward_canvases_per_s"] / row["forward_canvases_per_s"],
        "cost_vs_mae_path": mae["canvases_per_s"] / row["canvases_per_s"],
        "cost_vs_mae_forward": mae["forward_canvases_per_s"] / row["canvases_per_s"],
    }


class PromptSetup:
    """Visual prompting with ``recipe``'s method, timed against its bare forward.

    Builds an untrained method of the recipe and random supports, labels and queries, warms both
    paths up, and keeps the best of the passes :meth:`time_once` times: the tool's path
    (labels rendered, cells resized and stitched, the answer painted, cropped, resized and decoded)
    and the method's encoder-plus-decoder forward on the same canvases with the same mask.
    """

    @torch.no_grad()
    def __init__(
        self,
        recipe: str | Path,
        *,
        num_canvases: int = 256,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        from mimkit.data.transforms import Normalization
        from mimkit.eval.prompting import check_paintable, paint, paint_answers
        from mimkit.ssl import build_method
        from mimkit.ssl import canvas as cv
        from mimkit.train.config import load_recipe

        self.device = device = torch.device(device)
        loaded = load_recipe(recipe, check_data=False)
        method_cfg = loaded.method.to_dict()
        check_paintable(method_cfg, where=f"{recipe}: ")
        torch.manual_seed(seed)
        method = build_method(method_cfg).to(device).eval().requires_grad_(False)
        norm = Normalization.from_dict(loaded.normalization.to_dict(), 3)
        side = method.encoder.patch_embed.img_size[0]
        cell = cv.cell_size(side, int(getattr(method, "separator", 1)))
        palette = cv.Palette(int(getattr(method, "num_classes", 4)))
        g = torch.Generator().manual_seed(seed)
        b = min(batch_size, num_canvases)
        supports, queries = torch.randn(2, b, 3, side, side, generator=g)
        labels = torch.randint(palette.num_classes, (b, side, side), generator=g)
        batches = [min(b, num_canvases - lo) for lo in range(0, num_canvases, b)]

        def prompt_batch(n: int) -> torch.Tensor:
            outputs = palette.render(cv.resize_labels(labels[:n], cell))
            answers, _, _ = paint_answers(method, norm, supports[:n], outputs, queries[:n], device)
            resized = F.interpolate(answers, size=(side, side), mode="bilinear", align_corners=False)
            return palette.decode(resized)

        rendered = palette.render(cv.resize_labels(labels, cell))
        _, canvases, _ = paint_answers(method, norm, supports, rendered, queries, device)
        mask = cv.answer_patch_mask(method.encoder.grid_size).to(device).expand(b, -1)

        def forward_batch(n: int) -> torch.Tensor:
            return paint(method, canvases[:n], mask[:n])

        self.passes = {}
        for kind, step in (("prompt", prompt_batch), ("forward", forward_batch)):
            step(batches[0])  # warm-up
            self.passes[kind] = functools.partial(lambda step: [step(n) for n in batches], step)
        self.best = dict.fromkeys(self.passes, math.inf)
        self.info = {
            "recipe": str(recipe), "method": method_cfg.get("name", "mae"), "side": side,
            "grid": list(method.encoder.grid_size), "num_canvases": num_canvases, "batch_size": b,
        }  # fmt: skip

    @torch.no_grad()
    def time_once(self) -> None:
        """One timed pass over every canvas by each path; the best so far is kept."""
        for kind, run in self.passes.items():
            self.best[kind] = min(self.best[kind], best_seconds(run, 1, self.device))

    def result(self) -> dict[str, Any]:
        """``recipe, method, side, grid, num_canvases, batch_size, seconds, forward_seconds,
        canvases_per_s, forward_canvases_per_s, ratio`` (seconds over forward seconds)."""
        seconds, forward_seconds, n = self.best["prompt"], self.best["forward"], self.info["num_canvases"]
        return {
            **self.info, "seconds": seconds, "forward_seconds": forward_seconds,
            "canvases_per_s": n / seconds, "forward_canvases_per_s": n / forward_seconds,
            "ratio": seconds / forward_seconds,
        }  # fmt: skip
