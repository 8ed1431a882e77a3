"""``python tools/benchmark.py masks``: milliseconds to draw one batch of masks, per mask type.

Every registered mask type is built from ``{"type": T, "ratio": R}`` and called as the methods call
it, ``gen(batch, grid, generator=g)``. A colornoise type is timed once per colour
(``colornoise:green`` ...). The first call of each generator is timed apart as ``setup_ms``: it is
where colornoise makes its pattern bank, once per run and grid size, so the per-step cost is the
median of the calls after it. The default, a batch of 4096 on a 14 x 14 grid, is ViT-B/16 at 224
with MAE's global batch: ColorMAE's masks must cost well under one training step there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import machine_info, print_table


def _variants() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Mask types whose main option is timed value by value: type -> (option, values)."""
    from mimkit.ssl.colornoise import COLORS

    return {"colornoise": ("color", COLORS)}


def mask_specs(types: list[str] | None = None) -> list[str]:
    """The ``TYPE`` or ``TYPE:VALUE`` names to time; ``None``: every registered type and variant.

    A plain type that has variants (``colornoise``) expands to all of them. Unknown names raise a
    ``ValueError`` listing the valid ones.
    """
    import mimkit.ssl  # noqa: F401  (registers every mask type, colornoise included)
    from mimkit.ssl.masking import list_masks

    variants = _variants()
    valid = list_masks()
    out: list[str] = []
    for spec in types if types is not None else valid:
        kind, sep, value = spec.partition(":")
        if kind not in valid:
            named = [*valid, *(f"{t}:{v}" for t, (_, vs) in variants.items() if t in valid for v in vs)]
            raise ValueError(f"unknown mask type {spec!r}; valid: {', '.join(named)}")
        if kind in variants:
            option, values = variants[kind]
            if sep and value not in values:
                raise ValueError(f"unknown {option} {value!r} in {spec!r}; valid: {', '.join(values)}")
            out.extend([spec] if sep else [f"{kind}:{v}" for v in values])
        elif sep:
            raise ValueError(f"mask type {kind!r} takes no ':{value}' variant (only {', '.join(variants)})")
        else:
            out.append(kind)
    return list(dict.fromkeys(out))  # each once, in the order asked


def mask_config(spec: str, ratio: float) -> dict[str, Any]:
    """The recipe entry ``{"type": ..., "ratio": ..., [option: value]}`` of a ``TYPE[:VALUE]`` name."""
    kind, sep, value = spec.partition(":")
    cfg: dict[str, Any] = {"type": kind, "ratio": ratio}
    if sep:
        cfg[_variants()[kind][0]] = value
    return cfg


def time_masks(
    spec: str, batch: int, grid: tuple[int, int], ratio: float = 0.75, repeat: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Time ``repeat`` draws of a (batch, rows*cols) mask after one untimed-as-step first call."""
    from mimkit.ssl.masking import build, num_masked

    gen = build(mask_config(spec, ratio))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    gen(batch, grid, generator=g)
    setup = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mask = gen(batch, grid, generator=g)
        times.append(time.perf_counter() - t0)
    masked = int(mask[0].sum())
    assert masked == num_masked(grid[0] * grid[1], ratio)
    median = statistics.median(times)
    return {
        "type": spec,
        "batch": batch,
        "grid": list(grid),
        "ratio": ratio,
        "masked_per_sample": masked,
        "median_ms": median * 1e3,
        "min_ms": min(times) * 1e3,
        "setup_ms": setup * 1e3,
        "masks_per_s": batch / median,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    """The ``masks`` options."""
    parser.add_argument(
        "--types",
        nargs="+",
        help="mask types, TYPE or TYPE:VALUE (colornoise:green); default every registered type, "
        "colornoise in every colour",
    )
    parser.add_argument("--batch", type=int, default=4096, help="masks per draw (default 4096)")
    parser.add_argument(
        "--grid", type=int, nargs=2, default=[14, 14], metavar=("ROWS", "COLS"), help="patch grid (14 14)"
    )
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio for every type (default 0.75)")
    parser.add_argument("--repeat", type=int, default=5, help="timed draws per type; the median counts (5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")


def run(args: argparse.Namespace) -> dict:
    """``masks``: a table and the result dict (options, machine, one row per type)."""
    from tqdm import tqdm

    if args.batch < 1 or args.repeat < 1 or min(args.grid) < 1:
        raise ValueError(
            f"--batch, --repeat and --grid must be positive, got {args.batch}, {args.repeat}, {args.grid}"
        )
    specs = mask_specs(args.types)
    machine = machine_info()
    rows = [
        time_masks(spec, args.batch, tuple(args.grid), args.ratio, args.repeat, args.seed)
        for spec in tqdm(specs, desc="benchmark masks", unit="type", disable=args.no_progress)
    ]
    print_table(rows, ["type", "batch", "ratio", "median_ms", "min_ms", "setup_ms", "masks_per_s"])
    options = {k: getattr(args, k) for k in ("batch", "grid", "ratio", "repeat", "seed")}
    return {"benchmark": "masks", "options": options, "machine": machine, "results": rows}
