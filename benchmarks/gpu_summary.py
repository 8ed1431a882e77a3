"""The figures of one ``benchmarks/gpu_check.sh`` run beside the GPU targets: a table and summary.json.

``python benchmarks/gpu_summary.py DIR`` reads the JSON files the check wrote into DIR; a step that
failed or ran out of time shows as missing, with its exit status from ``status.tsv``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from mimkit.files import atomic_write_text  # noqa: E402

STEP_SPEEDUP_TARGET = 1.5  # bf16 trainer step over the original code's fp16-autocast step
MFU_TARGET = 0.45
VITL_MEMORY_TARGET_GB = 40.0  # ViT-L/16 MAE, batch 64 per GPU, with activation checkpointing
RETRIEVAL_TARGET_QPS = 1000.0  # at 10M keys of 768 dims


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in (result or {}).get("results", [])}


def _mimkit_row(result: dict[str, Any] | None) -> dict[str, Any] | None:
    return next((row for name, row in _rows(result).items() if name.startswith("mimkit")), None)


def _statuses(out: Path) -> dict[str, int]:
    try:
        lines = (out / "status.tsv").read_text().splitlines()[1:]
    except OSError:
        return {}
    return {name: int(code) for name, code, _ in (line.split("\t") for line in lines)}


def _check(value: float | None, target: float, at_least: bool = True) -> str:
    if value is None:
        return "missing"
    return "met" if (value >= target if at_least else value <= target) else "not met"


def summarize(out: Path) -> dict[str, Any]:
    """Every figure of the run, each with its target and whether it was met."""
    step = _read(out / "step_vitb.json")
    trainer = _mimkit_row(step)
    reference = _rows(step).get("reference MAE")
    compiled = _mimkit_row(_read(out / "step_vitb_compile.json"))
    speedup = trainer["images_per_s"] / reference["images_per_s"] if trainer and reference else None
    mfu = trainer["utilisation"] if trainer else None

    memory = {}
    for model in ("vitb", "vitl"):
        for ckpt in ("false", "true"):
            row = _mimkit_row(_read(out / f"memory_{model}_ckpt_{ckpt}.json"))
            mib = row.get("peak_memory_mib") if row else None
            memory[f"{model}_grad_checkpointing_{ckpt}_gb"] = round(mib * 2**20 / 1e9, 2) if mib else None
    vitl_ckpt = memory["vitl_grad_checkpointing_true_gb"]

    rows = (_read(out / "retrieval.json") or {}).get("results", [])
    retrieval = {row["memory_size"]: row["queries_per_s"] for row in rows}
    largest = retrieval.get(max(retrieval)) if retrieval else None
    figures = {
        "machine": _read(out / "machine.json"),
        "step_exit_codes": _statuses(out),
        "vitb_mae_bf16_images_per_s": trainer["images_per_s"] if trainer else None,
        "vitb_reference_fp16_images_per_s": reference["images_per_s"] if reference else None,
        "vitb_compiled_images_per_s": compiled["images_per_s"] if compiled else None,
        "speedup_over_reference": round(speedup, 3) if speedup else None,
        "mfu": mfu,
        "memory": memory,
        "retrieval_queries_per_s": retrieval,
        "targets": {
            f"step >= {STEP_SPEEDUP_TARGET}x the reference": _check(speedup, STEP_SPEEDUP_TARGET),
            f"MFU >= {MFU_TARGET:.0%}": _check(mfu, MFU_TARGET),
            f"ViT-L batch 64 with checkpointing <= {VITL_MEMORY_TARGET_GB:.0f} GB": _check(
                vitl_ckpt, VITL_MEMORY_TARGET_GB, at_least=False
            ),
            f"retrieval at the largest memory >= {RETRIEVAL_TARGET_QPS:.0f} queries/s": _check(
                largest, RETRIEVAL_TARGET_QPS
            ),
        },
    }
    return figures


def table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    fmt = lambda v: "missing" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| figure | value |", "| --- | --- |"]
    machine = summary["machine"] or {}
    lines.append(f"| device | {machine.get('gpu') or machine.get('device', 'unknown')} |")
    speeds = ("vitb_mae_bf16_images_per_s", "vitb_reference_fp16_images_per_s", "vitb_compiled_images_per_s")
    for key in (*speeds, "speedup_over_reference", "mfu"):
        lines.append(f"| {key} | {fmt(summary[key])} |")
    for key, value in summary["memory"].items():
        lines.append(f"| peak memory {key} | {fmt(value)} |")
    for size, qps in summary["retrieval_queries_per_s"].items():
        lines.append(f"| retrieval queries/s at {size} keys | {fmt(qps)} |")
    failed = {k: v for k, v in summary["step_exit_codes"].items() if v != 0}
    lines.append(f"| steps that failed (exit code) | {failed or 'none'} |")
    for target, verdict in summary["targets"].items():
        lines.append(f"| target: {target} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/gpu_summary.py DIR (the --out of gpu_check.sh)", file=sys.stderr)
        return 2
    out = Path(args[0])
    summary = summarize(out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
