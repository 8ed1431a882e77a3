"""``benchmarks/gpu_check.sh --dry-run``: every step of the GPU check runs on the CPU at toy sizes and
the summary reads every file it writes, so the script a GPU window depends on cannot rot."""

import json
import subprocess
import sys

import pytest

from benchmarks import gpu_summary
from tests.helpers import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["machine", "tests", "peak", "step_vitb", "step_vitb_compile", "memory_vitb_ckpt_false",
         "memory_vitl_ckpt_false", "memory_vitb_ckpt_true", "memory_vitl_ckpt_true", "retrieval"]  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = subprocess_env() | {"PYTHON": sys.executable}  # this interpreter, whatever venv runs the suite
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_every_step_runs_and_succeeds(dry_run):
    out, _ = dry_run
    lines = (out / "status.tsv").read_text().splitlines()
    statuses = {name: code for name, code, _ in (line.split("\t") for line in lines[1:])}
    assert list(statuses) == STEPS
    assert all(code == "0" for code in statuses.values()), statuses
    for name in STEPS[2:]:
        assert (out / f"{name}.json").is_file(), name


def test_checkpointing_reaches_the_trainer_path(dry_run):
    out, _ = dry_run
    for ckpt in ("false", "true"):
        options = json.loads((out / f"memory_vitl_ckpt_{ckpt}.json").read_text())["options"]
        assert options["set"][-1] == f"train.grad_checkpointing={ckpt}"
        assert options["backbone"] == "vit_tiny_patch16"


def test_summary_holds_every_figure_and_target(dry_run):
    out, proc = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["dry_run"] == 1 and summary["machine"]["device"] == "cpu"
    assert summary["speedup_over_reference"] > 0 and summary["mfu"] > 0
    assert all(v is not None and v > 0 for v in summary["memory"].values()), summary["memory"]
    assert set(summary["retrieval_queries_per_s"]) == {"1000", "2000"}
    assert len(summary["targets"]) == 4
    assert all(v in ("met", "not met") for v in summary["targets"].values())
    assert "| target: MFU >= 45% |" in proc.stdout


def test_a_missing_result_reads_as_missing(tmp_path):
    (tmp_path / "status.tsv").write_text("step\texit\tseconds\nstep_vitb\t124\t90\n")
    summary = gpu_summary.summarize(tmp_path)
    assert summary["speedup_over_reference"] is None
    assert summary["step_exit_codes"] == {"step_vitb": 124}
    assert set(summary["targets"].values()) == {"missing"}
    assert "{'step_vitb': 124}" in gpu_summary.table(summary)


def test_unknown_argument_is_named():
    proc = subprocess.run(["bash", str(SCRIPT), "--gpus", "8"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--gpus" in proc.stderr and "--dry-run" in proc.stderr
