"""The knn, linear_probe and compare_random commands (mimkit.cli, and tools/ run as scripts) on a tiny
encoder and tiny data."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.data import SOURCE_SCHEMES
from mimkit.eval import ExtractSettings
from mimkit.models import create_backbone, save_backbone
from tests.eval import single_thread as _single_thread

single_thread = pytest.fixture(autouse=True)(_single_thread)

REPO = Path(__file__).resolve().parents[2]
DATA = "synthetic:shapes?size=32&train=48&val=24"
RESULT_KEYS = {"tool", "protocol", "encoder", "data", "settings", "results", "mimkit_version", "created"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    torch.manual_seed(123)  # not 0: --random-init's default seed would rebuild these very weights
    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)
    return save_backbone(model, tmp_path_factory.mktemp("export") / "tiny").parent


def _tool(name: str):
    """The command's module, :mod:`mimkit.cli.<name>` (``tools/<name>.py`` is a wrapper over it)."""
    return importlib.import_module(f"mimkit.cli.{name}")


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / f"{name}.py"), *args, "--workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def test_knn_tool_writes_the_json(encoder, tmp_path):
    out = tmp_path / "knn.json"
    proc = _run("knn", "--encoder", str(encoder), "--train", DATA, "--ks", "5", "10", "--shots", "1", "2",
                "--tries", "2", "--json", str(out))  # fmt: skip
    assert "k=10" in proc.stdout and "few-shot" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) >= RESULT_KEYS and res["protocol"] == "dino-weighted-knn"
    assert set(res["results"]["knn"]) == {"5", "10"}
    assert set(res["results"]["few_shot"]["2"]["2"]) == {"mean", "std", "tries"}
    assert res["settings"]["temperature"] == 0.07 and res["data"]["num_train"] == 48
    assert res["encoder"]["random_init"] is False and res["encoder"]["config"]["embed_dim"] == 32
    extract = res["settings"]["extract"]  # the shared arguments, as ExtractSettings recorded them
    assert set(extract) == set(dataclasses.asdict(ExtractSettings())) - {"progress"}
    assert (extract["img_size"], extract["batch_size"], extract["workers"]) == (32, 256, 0)


def test_linear_probe_tool_runs_maes_augmented_protocol(encoder, tmp_path):
    out = tmp_path / "lp.json"
    proc = _run("linear_probe", "--encoder", str(encoder), "--train", DATA, "--epochs", "2",
                "--effective-batch", "16", "--batch-size", "8", "--json", str(out))  # fmt: skip
    assert "16 = 8 x 2 accumulated" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) >= RESULT_KEYS and res["protocol"] == "mae-linear-probe" and res["mode"] == "augmented"
    s = res["settings"]
    assert (s["effective_batch"], s["batch_size"], s["accum_steps"], s["steps_per_epoch"]) == (16, 8, 2, 3)
    assert s["lr"] == pytest.approx(0.1 * 16 / 256) and s["weight_decay"] == 0.0
    assert len(res["results"]["top1_per_epoch"]) == 2


def test_linear_probe_tool_grid_cached_in_process(encoder, tmp_path, capsys):
    out = tmp_path / "grid.json"
    args = ["--encoder", str(encoder), "--train", DATA, "--preset", "grid", "--cached", "--epochs", "1",
            "--epoch-length", "2", "--batch-size", "16", "--random-init", "--workers", "0", "--no-progress",
            "--json", str(out)]  # fmt: skip
    assert _tool("linear_probe").main(args) == 0
    assert "selected head" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["mode"] == "cached" and "not the published protocol" in res["note"]
    assert len(res["results"]["grid"]) == 104 and res["settings"]["iterations"] == 2
    assert res["results"]["best"]["name"] in {h["name"] for h in res["results"]["grid"]}
    assert res["encoder"]["random_init"] is True


def test_compare_random_prints_both_encoders(encoder, tmp_path, capsys):
    out = tmp_path / "compare.json"
    args = ["--encoder", str(encoder), "--train", DATA, "--ks", "5", "10", "--epochs", "3",
            "--effective-batch", "16", "--workers", "0", "--no-progress", "--json", str(out)]  # fmt: skip
    assert _tool("compare_random").main(args) == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "random init" in printed and "k=10" in printed
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"pretrained", "random init"}
    assert set(res["results"]["random init"]) >= {"knn", "linear_probe"}
    assert res["encoder"]["pretrained"]["sha256"] != res["encoder"]["random init"]["sha256"]
    assert set(res["results"]["pretrained"]["knn_patch_mean"]) == {"5", "10"}


def test_compare_random_with_seg_adds_incontext_and_the_gains(encoder, tmp_path, capsys):
    out = tmp_path / "compare.json"
    seg = "synthetic:shapes?size=32&train=8&val=4"
    args = ["--encoder", str(encoder), "--train", DATA, "--ks", "5", "--epochs", "2", "--effective-batch",
            "16", "--workers", "0", "--no-progress", "--seg", seg, "--json", str(out)]  # fmt: skip
    assert _tool("compare_random").main(args) == 0
    printed = capsys.readouterr().out
    assert "pretraining vs random init" in printed and "in-context mIoU %" in printed
    res = json.loads(out.read_text())
    knn = res["results"]["pretrained"]["knn"]["5"] - res["results"]["random init"]["knn"]["5"]
    assert f"{knn:+.2f}" in printed  # the gain row is the difference of the two columns
    assert set(res["incontext"]) == {"pretrained", "random init"}
    assert 0 <= res["incontext"]["pretrained"]["results"]["miou"] <= 1
    with pytest.raises(SystemExit):  # a source without masks fails before any feature is computed
        _tool("compare_random").main([*args[:-4], "--seg", "folder:/nonexistent"])


def _error(tool: str, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        _tool(tool).main([*args, "--workers", "0", "--no-progress"])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("tool", ["knn", "linear_probe"])
def test_missing_encoder_is_a_clear_error(tool, tmp_path, capsys):
    err = _error(tool, ["--encoder", str(tmp_path / "nope"), "--train", DATA], capsys)
    assert "nope" in err and "no such file or directory" in err


@pytest.mark.parametrize("tool", ["knn", "linear_probe"])
def test_a_source_without_labels_is_a_clear_error(tool, encoder, monkeypatch, capsys):
    def unlabelled(spec, split, transform):
        return [{"image": torch.zeros(3, 32, 32)} for _ in range(4)]

    monkeypatch.setitem(SOURCE_SCHEMES, "unlabelled", unlabelled)
    err = _error(tool, ["--encoder", str(encoder), "--train", "unlabelled:x"], capsys)
    assert "'unlabelled:x'" in err and "yields no labels" in err


@pytest.mark.parametrize("unlabelled", ["train", "val", "both"])
@pytest.mark.parametrize("tool", ["knn", "linear_probe"])
def test_an_unlabelled_folder_is_a_clear_error_before_any_feature(
    tool, unlabelled, encoder, tmp_path, monkeypatch, capsys
):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")

    def no_features(*args, **kwargs):
        raise AssertionError("features were extracted before the labels were checked")

    for module in ("mimkit.eval.features", "mimkit.eval.linear_probe"):  # by module: the package shadows them
        monkeypatch.setattr(importlib.import_module(module), "extract_features", no_features)
    folder = f"folder:{tmp_path}"
    sources = {"train": folder, "val": DATA} if unlabelled == "train" else {"train": DATA, "val": folder}
    if unlabelled == "both":
        sources = {"train": folder, "val": folder}
    args = ["--encoder", str(encoder), "--train", sources["train"], "--val", sources["val"]]
    err = _error(tool, args, capsys)
    assert f"{folder!r}" in err and "yields no labels" in err
    assert "images sit directly in" in err and "PATH/<class>/<image>" in err


def test_options_of_the_other_preset_are_rejected(encoder, capsys):
    err = _error("linear_probe", ["--encoder", str(encoder), "--train", DATA, "--epoch-length", "5"], capsys)
    assert "--epoch-length do not apply to --preset mae" in err


def test_normalisation_override_is_used_printed_and_checked(encoder, tmp_path, capsys):
    knn = _tool("knn")
    out = tmp_path / "knn.json"
    override = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    knn.main(["--encoder", str(encoder), "--train", DATA, "--ks", "5", "--shots", "1", "--tries", "1",
              "--workers", "0", "--no-progress", *override, "--json", str(out)])  # fmt: skip
    assert "replaces the encoder's" in capsys.readouterr().out
    recorded = json.loads(out.read_text())["encoder"]["normalization"]
    assert recorded == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    with pytest.raises(SystemExit):
        knn.main(["--encoder", str(encoder), "--train", DATA, "--mean", "0.5"])
    assert "--mean and --std go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        knn.main(["--encoder", str(encoder), "--train", DATA, "--mean", "0.5", "--std", "0.2"])
    assert "1 channel(s) but the encoder reads 3" in capsys.readouterr().err
