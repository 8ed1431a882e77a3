"""Training on greyscale data: one channel, the data's own statistics, recorded for evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mimkit.eval import ExtractSettings
from mimkit.eval.features import input_normalization, load_encoder, source_features
from tests.helpers import subprocess_env
from tests.train.test_pretrain import TINY

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "pretrain.py"


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory) -> Path:
    """32 train + 8 val greyscale images stored as RGB PNGs, two classes (dark and bright blobs)."""
    root = tmp_path_factory.mktemp("grey")
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 8)):
        for i in range(count):
            label = i % 2
            grey = rng.normal(60 + 120 * label, 30, (32, 32)).clip(0, 255).astype(np.uint8)
            path = root / split / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(path)
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY)
    return path


def _pretrain(recipe: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), str(recipe), f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_greyscale_folder_trains_on_one_channel_with_its_own_statistics(recipe, grey_folder, tmp_path):
    run_dir = tmp_path / "run"
    proc = _pretrain(
        recipe,
        run_dir,
        f"data.source=folder:{grey_folder}",
        "data.channels=1",
        "data.mean=auto",
        "data.std=auto",
        "train.max_steps=2",
    )
    assert "greyscale" not in proc.stderr  # the format fits: no warning
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())["data"]
    pixels = np.concatenate(
        [
            np.asarray(Image.open(p).convert("L"), np.float64).ravel() / 255
            for p in grey_folder.rglob("train/*/*.png")
        ]
    )
    assert resolved["channels"] == 1
    np.testing.assert_allclose(resolved["mean"], [pixels.mean()], atol=1e-3)
    np.testing.assert_allclose(resolved["std"], [pixels.std()], atol=1e-3)

    config = json.loads((run_dir / "encoder.json").read_text())
    assert config["in_chans"] == 1
    assert config["normalization"] == {"mean": resolved["mean"], "std": resolved["std"]}
    for random_init in (False, True):  # the floor reads the images the same way
        encoder = load_encoder(run_dir, random_init=random_init)
        assert input_normalization(encoder).mean == tuple(resolved["mean"])
    feats = source_features(encoder, f"folder:{grey_folder}", "val", ExtractSettings(progress=False))
    assert feats["cls"].shape == (8, encoder.embed_dim) and torch.isfinite(feats["cls"]).all()


def test_greyscale_folder_read_as_rgb_says_so_and_names_the_key(recipe, grey_folder, tmp_path):
    proc = _pretrain(recipe, tmp_path / "run", f"data.source=folder:{grey_folder}", "train.max_steps=1")
    assert "greyscale" in proc.stderr and "data.channels=1" in proc.stderr
    config = json.loads((tmp_path / "run" / "encoder.json").read_text())
    assert config["in_chans"] == 3 and config["normalization"]["mean"] == [0.485, 0.456, 0.406]
