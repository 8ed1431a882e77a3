"""``python tools/benchmark.py incontext``: in-context retrieval queries/s against memory size.

A thin wrapper over :func:`benchmark_incontext`: random unit keys of ``--dim``
dimensions and random class-fraction values, ``--queries`` query patches searched exactly (chunked
matmul + top-k) and aggregated as the dense retrieval evaluation does; the best of ``--repeat``
timed runs after a warm-up counts. The default sizes match the scales of issue #10 on one machine.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, print_table
from mimkit.eval.incontext import DEFAULT_K, DEFAULT_TEMPERATURE, MemoryBank, patch_distributions
from mimkit.eval.retrieval import KEY_DTYPES, default_key_dtype


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
        best = math.inf
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            patch_distributions(queries, memory, **call)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        out.append(
            {
                "memory_size": size, "dim": dim, "num_queries": num_queries, "k": k, "key_dtype": key_dtype,
                "device": str(device), "seconds": best, "queries_per_s": num_queries / best,
            }
        )  # fmt: skip
    return out
