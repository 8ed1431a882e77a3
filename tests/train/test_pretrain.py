"""End-to-end runs of tools/pretrain.py on CPU at a tiny size, each in its own process.

Every run trains ``vit_tiny`` cut to depth 2 at 32 px (16 patches) with a 32-wide, 1-deep decoder
on 32 synthetic images: micro batch 4, global batch 8, so one process accumulates 2 micro-batches
and an epoch is 4 optimizer steps. Runs of 6 steps cross an epoch boundary.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.models import load_backbone
from mimkit.train import load_method, load_recipe
from mimkit.train.checkpoint import LATEST, tag_for
from mimkit.train.distributed import free_port
from tests.helpers import subprocess_env, tiny_mae_recipe

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "pretrain.py"
STEPS = 6

TINY = tiny_mae_recipe(STEPS)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY)
    return path


def _env() -> dict:
    env = subprocess_env()
    return env


def pretrain(recipe: Path, run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), str(recipe), f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"parameters differ: {different[:5]}"


@pytest.fixture(scope="module")
def straight_run(recipe, tmp_path_factory) -> Path:
    """The uninterrupted reference run."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = pretrain(recipe, run_dir)
    assert "finished" in proc.stdout and "encoder" in proc.stdout
    return run_dir


def test_run_directory_and_exports(straight_run):
    run = straight_run
    for name in ("recipe.yaml", "metrics.jsonl", "model.safetensors", "encoder.safetensors", "encoder.json"):
        assert (run / name).is_file(), name
    resolved = load_recipe(run / "recipe.yaml")
    assert resolved.run.dir == str(run) and resolved.train.max_steps == STEPS and resolved.accumulation == 2
    assert (run / "checkpoints" / LATEST).read_text() == tag_for(STEPS)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == [tag_for(STEPS - 2), tag_for(STEPS)]  # keep_checkpoints: 2

    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for key in ("epoch", "loss", "lr", "grad_norm", "images_per_s", "skipped_steps"):
        assert all(m[key] is not None for m in metrics), key
    assert metrics[0]["lr"] == 0.0 and metrics[-1]["epoch"] == pytest.approx(STEPS / 4)

    method = load_method(run)
    encoder = load_backbone(run)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(method.encoder.forward_features(images), encoder.forward_features(images))
    assert not any(p.isnan().any() for p in method.parameters())


def test_kill_and_resume_matches_uninterrupted(recipe, straight_run, tmp_path):
    run = tmp_path / "run"
    # Workers load in other processes; samples are seeded per (seed, epoch, index), so no change.
    proc = pretrain(recipe, run, "debug.kill_after_step=3", "data.workers=2", expect=-signal.SIGKILL)
    assert (run / "checkpoints" / LATEST).read_text() == tag_for(2)
    assert not (run / "model.safetensors").exists()
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]

    proc = pretrain(recipe, run)
    assert "resumed at step 2" in proc.stdout
    _assert_same_model(run, straight_run)
    assert [m["step"] for m in _metrics(run)] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in _metrics(straight_run)]


def test_kill_during_save_keeps_previous_checkpoint(recipe, straight_run, tmp_path):
    run = tmp_path / "run"
    pretrain(recipe, run, "debug.kill_in_save_at_step=4", expect=137)
    ckpts = run / "checkpoints"
    assert (ckpts / LATEST).read_text() == tag_for(2)
    assert (ckpts / tag_for(4)).is_dir()  # the half-written save is there, but not published

    proc = pretrain(recipe, run)
    assert "resumed at step 2" in proc.stdout
    _assert_same_model(run, straight_run)


def test_nonfinite_loss_stops_with_step_and_checkpoint(recipe, straight_run, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(recipe, run, "debug.nan_at_step=3", expect=1)
    assert "loss is nan at step 3" in proc.stderr
    assert str(run / "checkpoints" / tag_for(2)) in proc.stderr
    assert [m["step"] for m in _metrics(run)] == [1, 2]

    proc = pretrain(recipe, run)  # the last good checkpoint loads and the run completes
    assert "resumed at step 2" in proc.stdout
    _assert_same_model(run, straight_run)


DRIVER = """\
import os, sys, torch
from mimkit.train import load_recipe, pretrain
from mimkit.train.distributed import world_size_from_env
recipe = load_recipe(sys.argv[1], sys.argv[3:], world_size=world_size_from_env())
result = pretrain(recipe)
state = {k: v.detach().clone() for k, v in result.module.state_dict().items()}
torch.save(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_two_ranks_zero2_agree(recipe, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(driver),
        str(recipe),
        str(tmp_path),
        f"run.dir={run}",
        "train.zero_stage=2",
        "train.max_steps=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("finished") == 1  # rank 0 reports alone

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    exported = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(exported[k], rank0[k]) for k in rank0)
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["grad_norm"] > 0 for m in metrics)
