"""What every evaluation tool shares: its command-line arguments, result tables and JSON files.

Tools take ``--encoder PATH`` (an export directory, ``encoder.safetensors`` or a pretraining run
directory), ``--train SOURCE`` and ``--val SOURCE`` (the val split of ``--train`` by default),
``--device``, ``--batch-size``, ``--json PATH``, ``--random-init`` (an untrained encoder of the
same shape, the floor every result is read against), ``--img-size`` (the encoder's by default) and
``--mean`` / ``--std`` (the input normalisation; by default the one the encoder export records).
:func:`check_common_args` turns them into ``args.normalization`` (for ``load_encoder``) and
``args.extract``, the :class:`~mimkit.eval.settings.ExtractSettings` every protocol takes.
A result is a dict ``{"tool", "protocol", "encoder", "data", "settings", "results", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import mimkit
from mimkit.data.transforms import Normalization
from mimkit.eval.settings import PRECISIONS, ExtractSettings
from mimkit.files import atomic_write_text


def default_device() -> str:
    """``cuda`` where a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers() -> int:
    """DataLoader processes for the evaluation tools: the usable CPUs, at most 8, where a GPU is
    visible, else 0.

    On the CPU the forward pass already uses every core; loader processes take cores from it, and
    the loading done beside it in the calling process (a prefetch thread) was faster.
    """
    if not torch.cuda.is_available():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


def add_eval_args(
    parser: argparse.ArgumentParser, *, batch_size: int | None = 256, batch_size_help: str | None = None
) -> None:
    """Add the shared evaluation arguments to a tool's parser."""
    parser.add_argument(
        "--encoder",
        required=True,
        help="exported encoder: a directory holding encoder.safetensors + encoder.json, the "
        "encoder.safetensors file itself, or a pretraining run directory",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="with a backbone name as --encoder (e.g. vit_base_patch16): its timm-keyed state dict "
        "(.safetensors, or a torch file with the weights under 'model' or at the top level)",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="labelled source for the train split, e.g. 'synthetic:shapes?train=2000&val=500'",
    )
    parser.add_argument("--val", default=None, help="labelled source for the val split (default: --train's)")
    parser.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=batch_size_help or "images per forward pass (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument(
        "--random-init", action="store_true", help="evaluate an untrained encoder of the same shape instead"
    )
    parser.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the encoder's)"
    )
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="autocast dtype of the frozen forward passes (default: %(default)s; bf16 is about twice as "
        "fast on CPUs with AVX512-BF16 or AMX)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="data-loading processes (default: 0 without a CUDA device, where loader processes take "
        "cores from the forward pass; with one, the usable CPUs, at most 8: %(default)s)",
    )
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="input normalisation mean per channel, replacing the encoder export's (default: the export's)",
    )
    parser.add_argument(
        "--std", type=float, nargs="+", default=None, help="input normalisation std per channel (with --mean)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of draws, heads and --random-init")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache frozen features here (keyed by encoder + data + transform)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad shared arguments with a message naming the value; set ``args.extract`` and
    ``args.normalization`` (None: the encoder export's)."""
    try:
        args.extract = ExtractSettings.from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if (args.mean is None) != (args.std is None):
        parser.error("--mean and --std go together: give both (one value per input channel) or neither")
    if args.mean is not None:
        try:
            args.normalization = Normalization(tuple(args.mean), tuple(args.std))
        except ValueError as err:
            parser.error(f"--mean {args.mean} --std {args.std}: {err}")
    else:
        args.normalization = None
    if not Path(args.encoder).exists():
        from mimkit.models import list_backbones

        if args.encoder not in list_backbones():
            parser.error(
                f"--encoder {args.encoder}: no such file or directory (expected an export directory, "
                "encoder.safetensors, or a pretraining run directory)"
            )


@contextmanager
def one_thread_on_cpu(device: str | torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU for loops of small kernels (heads on cached features, few-shot).

    Each step of a linear head is a few small kernels; OpenMP's barriers between them cost more
    than the work, and on a shared machine (more runnable threads than cores) two threads made
    90 epochs of MAE's probe on 2000 features take 51 s instead of 0.5 s.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def data_info(
    train_uri: str, val_uri: str, img_size: int, num_train: int, num_val: int, num_classes: int
) -> dict:
    """The ``data`` entry of a result: sources (train split of one, val split of the other) and sizes."""
    return {
        "train": f"{train_uri} [train split]",
        "val": f"{val_uri} [val split]",
        "img_size": img_size,
        "num_train": num_train,
        "num_val": num_val,
        "num_classes": num_classes,
        "eval_transform": f"resize shorter side to {int(img_size / 0.875)} (bicubic), centre crop {img_size}",
    }


def result(
    tool: str, protocol: str, encoder: dict, data: dict, settings: dict, results: dict, **extra
) -> dict:
    """A result dict in the shared layout."""
    return {
        "tool": tool,
        "protocol": protocol,
        "encoder": encoder,
        "data": data,
        "settings": settings,
        "results": results,
        **extra,
        "mimkit_version": mimkit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table: left-aligned first column, right-aligned others, floats to 2 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [values[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON through a temporary name and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def encoder_from_args(args: argparse.Namespace):
    """The encoder the shared arguments name (``--encoder``, ``--random-init``, ``--img-size``,
    ``--checkpoint``, ``--seed``, ``--device``, ``--mean`` / ``--std``), frozen on its device."""
    from mimkit.eval.features import load_encoder

    return load_encoder(
        args.encoder,
        random_init=args.random_init,
        img_size=args.img_size,
        checkpoint=args.checkpoint,
        seed=args.seed,
        device=args.device,
        normalization=args.normalization,
    )
