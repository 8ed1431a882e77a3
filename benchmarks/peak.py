"""``benchmark.py peak``: measured matmul throughput at a model's shapes, the denominator of utilisation.

A ViT training step is almost all matrix products of tokens against weights: per block the qkv
projection (D -> 3D), the attention output projection (D -> D) and the MLP (D -> 4D -> D). This
benchmark times exactly those products at the token counts of an MAE step (the encoder sees the
visible tokens plus cls, the decoder every token plus cls) in fp32 and bf16, and calls the best
rate per dtype the device's peak. A vendor datasheet number would be higher than any real kernel
reaches at these shapes; utilisation against a measured peak says how much a step leaves on
the table.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import machine_info, print_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def block_shapes(
    prefix: str, tokens: int, dim: int, mlp_ratio: float = 4.0
) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of the four weight matmuls of one ViT block over ``tokens`` rows."""
    hidden = int(dim * mlp_ratio)
    return [
        (f"{prefix} qkv", tokens, dim, 3 * dim),
        (f"{prefix} proj", tokens, dim, dim),
        (f"{prefix} fc1", tokens, dim, hidden),
        (f"{prefix} fc2", tokens, hidden, dim),
    ]


def mae_shapes(
    embed_dim: int, decoder_dim: int, batch: int, num_patches: int, mask_ratio: float = 0.75
) -> list[tuple[str, int, int, int]]:
    """The weight matmuls of an MAE step: encoder on 1 + visible tokens, decoder on 1 + all tokens."""
    visible = int(num_patches * (1 - mask_ratio))
    return block_shapes("encoder", batch * (1 + visible), embed_dim) + block_shapes(
        "decoder", batch * (1 + num_patches), decoder_dim
    )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads finished work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, min_seconds: float = 0.25
) -> float:
    """FLOP/s of ``(m, k) @ (k, n)`` (2mkn FLOPs), timed over at least ``min_seconds`` after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(k, n, generator=g).to(device, dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    torch.matmul(a, b, out=out)
    sync(device)
    tic = time.perf_counter()
    torch.matmul(a, b, out=out)
    sync(device)
    once = max(time.perf_counter() - tic, 1e-6)
    reps = max(1, int(min_seconds / once))
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=out)
    sync(device)
    return 2.0 * m * k * n * reps / (time.perf_counter() - start)


def measure_peak(
    shapes: list[tuple[str, int, int, int]],
    dtypes: list[str],
    device: torch.device,
    min_seconds: float = 0.25,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per (shape, dtype) and the peak (best GFLOP/s) per dtype."""
    rows, peak = [], {}
    for dtype in dtypes:
        for name, m, k, n in shapes:
            rate = matmul_flops_per_s(m, k, n, DTYPES[dtype], device, min_seconds) / 1e9
            rows.append(
                {"matmul": name, "m": m, "k": k, "n": n, "dtype": dtype, "gflop_per_s": round(rate, 2)}
            )
            peak[dtype] = max(peak.get(dtype, 0.0), round(rate, 2))
    return rows, peak


def model_dims(backbone: str, img_size: int, patch_size: int | None = None) -> tuple[int, int]:
    """(embed_dim, num_patches) of a registered backbone at ``img_size`` (and ``patch_size`` if given)."""
    from mimkit.models import create_backbone

    options = (
        {"img_size": img_size} if patch_size is None else {"img_size": img_size, "patch_size": patch_size}
    )
    with torch.device("meta"):  # shapes only: no memory, no init time
        net = create_backbone(backbone, **options)
    return net.embed_dim, net.num_patches


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone", default="vit_small_patch16", help="registered backbone (vit_small_patch16)"
    )
    parser.add_argument("--img-size", type=int, default=224, help="image side (224)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch side (default: the backbone's)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (32)")
    parser.add_argument("--decoder-dim", type=int, default=512, help="MAE decoder width (512)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="masked share of patches (0.75)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto)")
    parser.add_argument("--min-seconds", type=float, default=0.25, help="time per measurement (0.25)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dim, patches = model_dims(args.backbone, args.img_size, args.patch_size)
    shapes = mae_shapes(dim, args.decoder_dim, args.batch, patches, args.mask_ratio)
    rows, peak = measure_peak(shapes, args.dtypes, device, args.min_seconds)
    print_table(rows, ["matmul", "m", "k", "n", "dtype", "gflop_per_s"])
    print("peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    options = {
        k: getattr(args, k)
        for k in ("backbone", "img_size", "patch_size", "batch", "decoder_dim", "mask_ratio", "dtypes")
    }
    return {
        "benchmark": "peak",
        "device": str(device),
        "options": options,
        "machine": machine_info(),
        "peak_gflop_per_s": peak,
        "results": rows,
    }
