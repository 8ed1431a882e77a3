"""Watching a run: the loggers, the online k-NN monitor and reconstructions during training.

The end-to-end runs train the tiny MAE of test_pretrain.py (an epoch is 4 steps of 8 images) in
their own processes; one is killed after step 3 (its last checkpoint is step 2) and resumed.
"""

import csv
import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from safetensors.torch import load_file

from mimkit.train import RecipeError, load_recipe
from mimkit.train.loggers import WANDB_DIR, WANDB_STATE, MissingLoggerPackage, TensorBoardLogger
from tests.helpers import subprocess_env, tiny_mae_recipe

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "pretrain.py"
STEPS = 6
TINY = tiny_mae_recipe(STEPS)
WATCHED = (
    "run.loggers=[csv,tensorboard,wandb]",
    "run.monitor={every: 2, images: 16, queries: 8, k: 5}",
    "run.images_every=3",
)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY)
    return path


def pretrain(recipe: Path, run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(TOOL), str(recipe), f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_run(recipe, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    pretrain(recipe, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(recipe, tmp_path_factory) -> Path:
    """Every watcher on, killed after step 3 (checkpoint at 2) and resumed to the end."""
    run_dir = tmp_path_factory.mktemp("watched") / "run"
    pretrain(recipe, run_dir, *WATCHED, "debug.kill_after_step=3", expect=-signal.SIGKILL)
    proc = pretrain(recipe, run_dir, *WATCHED)
    assert "resumed at step 2" in proc.stdout
    assert "monitor and pictures took" in proc.stdout
    return run_dir


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_watchers_do_not_change_training(plain_run, resumed_run):
    """Monitor, pictures and loggers draw from no training stream: same losses, same weights."""
    assert [m["loss"] for m in _metrics(resumed_run) if "loss" in m] == [
        m["loss"] for m in _metrics(plain_run)
    ]
    a, b = load_file(str(plain_run / "model.safetensors")), load_file(str(resumed_run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_holds_each_step_once_after_kill_and_resume(resumed_run):
    events = _tensorboard(resumed_run)
    jsonl = _metrics(resumed_run)
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    expected = [m["loss"] for m in jsonl if "loss" in m]
    assert [e.value for e in losses] == pytest.approx(expected, rel=1e-6)
    for key in ("lr", "grad_norm", "images_per_s"):
        assert [e.step for e in events.Scalars(key)] == list(range(1, STEPS + 1)), key
    # the monitor runs before training, every 2 steps and at the end; the picture every 3 steps
    assert [e.step for e in events.Scalars("monitor_knn_cls")] == [0, 2, 4, 6]
    assert [e.step for e in events.Images("reconstructions")] == [0, 3, 6]


def test_a_run_killed_before_its_first_checkpoint_starts_its_logs_over(recipe, tmp_path):
    run_dir = tmp_path / "run"
    watched = ("run.loggers=[csv,tensorboard]", "run.images_every=1", "train.max_steps=3")
    pretrain(recipe, run_dir, *watched, "debug.kill_after_step=1", expect=-signal.SIGKILL)
    pretrain(recipe, run_dir, *watched, "run.images_every=2")
    assert [e.step for e in _tensorboard(run_dir).Scalars("loss")] == [1, 2, 3]
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    # the first process's picture of step 1 is gone with its run
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        f"step0000000{s}.png" for s in (0, 2, 3)
    ]


def test_csv_mirrors_metrics_jsonl(resumed_run):
    jsonl = _metrics(resumed_run)
    with open(resumed_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [m["step"] for m in jsonl]
    assert [m["step"] for m in jsonl] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]  # monitor records share steps
    for row, record in zip(rows, jsonl):
        for key, value in record.items():
            assert row[key] == ("" if value is None else str(value)), key
        assert all(row[k] == "" for k in row if k not in record)


def test_monitor_records_and_pictures(resumed_run):
    monitors = [m for m in _metrics(resumed_run) if "monitor_knn_cls" in m]
    assert [m["step"] for m in monitors] == [0, 2, 4, 6]
    for m in monitors:
        assert 0 <= m["monitor_knn_cls"] <= 100 and 0 <= m["monitor_knn_patch_mean"] <= 100
        assert m["monitor_seconds"] > 0
    pictures = sorted(p.name for p in (resumed_run / "images").iterdir())
    assert pictures == ["step00000000.png", "step00000003.png", "step00000006.png"]


def _wandb_history(path: Path) -> list[tuple[int, set[str]]]:
    """(step, keys) of every history row in a W&B transaction log (LevelDB-log framed protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, rows = path.read_bytes(), 32768, 7, b"", []  # 7: W&B's file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                keys = {item.key or "/".join(item.nested_key) for item in record.history.item}
                rows.append((record.history.step.num, keys))
    return rows


def test_wandb_offline_run_holds_the_config_and_every_step_once(resumed_run):
    directory = resumed_run / WANDB_DIR
    state = json.loads((directory / WANDB_STATE).read_text())
    assert state["finished"] is True
    offline = sorted(directory.glob("offline-run-*"))
    assert len(offline) == 2  # the killed process's and the resumed one's, under one id
    assert all(p.name.endswith(state["id"]) for p in offline)
    latest = offline[-1]
    assert (latest / "files" / "recipe.yaml").read_text() == (resumed_run / "recipe.yaml").read_text()
    log = latest / f"run-{state['id']}.wandb"
    assert b"checkpoint_every" in log.read_bytes()  # the config record
    # the killed process's log was lost with it; the resumed one replayed steps 0-2 before going on
    rows = _wandb_history(log)
    assert [step for step, _ in rows] == list(range(STEPS + 1))
    assert [step for step, keys in rows if "loss" in keys] == list(range(1, STEPS + 1))
    assert [step for step, keys in rows if "monitor_knn_cls" in keys] == [0, 2, 4, 6]
    assert [step for step, keys in rows if any(k.startswith("reconstructions") for k in keys)] == [0, 3, 6]


def test_missing_logger_package_names_the_extra(monkeypatch, recipe):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(RecipeError, match=r"pip install 'mimkit\[wandb\]'"):
        load_recipe(recipe, ["run.loggers=[wandb]"])
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingLoggerPackage, match=r"pip install 'mimkit\[tensorboard\]'"):
        TensorBoardLogger(Path("unused"), None)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.loggers=[mlflow]", "run.loggers must be a list of jsonl, csv, tensorboard, wandb"),
        ("run.monitor={every: 10, image: 5}", "unknown key run.monitor.image"),
        ("run.monitor={every: 0}", "run.monitor.every must be a positive integer"),
        ("run.monitor={images: 10, k: 20}", "run.monitor.k must be at most run.monitor.images=10"),
        ("run.monitor={source: 'wds:/x/train-index.json'}", "run.monitor.source must be a labelled indexed"),
        ("run.images_every=-1", "run.images_every must be steps >= 0"),
        (
            ("data.source=wds:/x/train-index.json", "run.monitor={}"),
            "run.monitor.source is null, so it reads",
        ),
    ],
)
def test_bad_watch_settings_are_recipe_errors(recipe, override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        load_recipe(recipe, [override] if isinstance(override, str) else list(override), check_data=False)


def test_monitor_too_large_fails_before_training(recipe, tmp_path):
    proc = pretrain(recipe, tmp_path / "run", "run.monitor={images: 100}", expect=2)
    assert "run.monitor.images=100: the train split of 'synthetic:shapes" in proc.stderr
    assert "holds 32 images" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_curves_overlay_several_runs(plain_run, resumed_run, tmp_path, monkeypatch):
    from mimkit.cli import visualize

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    monkeypatch.chdir(tmp_path)
    assert visualize.main(["curves", str(plain_run), str(resumed_run)]) == 0
    assert (tmp_path / "curves.png").is_file()
    panels = {ax.get_title(): ax for ax in figures[0].axes}
    # both runs in the loss panel, named by directory; the monitor only in the watched run's
    assert len(panels["loss"].get_lines()) == 2
    assert [t.get_text() for t in panels["loss"].get_legend().get_texts()] == [
        str(plain_run),
        str(resumed_run),
    ]
    assert len(panels["monitor_knn_cls"].get_lines()) == 1
    with pytest.raises(SystemExit):
        visualize.main(["curves", str(plain_run), str(tmp_path / "missing")])
