"""Bad images in a ``folder:`` source: counted through the training loader, logged, and judged.

The pretraining runs use test_pretrain.py's tiny recipe (ViT-Ti cut to depth 2 at 32 px, global
batch 8, micro batch 4) on an unlabelled flat folder of 32 images plus a README, a quarter of the
images cut mid-data: pretraining on one's own unlabelled images, with the damage real folders have.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import ImageFolderSource
from mimkit.data.bad import BadSampleWarning
from mimkit.train.distributed import Dist
from mimkit.train.loader import build_loader
from mimkit.train.trainer import BadDataError, _data_counts
from tests.helpers import subprocess_env
from tests.train.test_pretrain import TINY

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "pretrain.py"
ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _write_folder(root: Path, images: int, bad_every: int) -> list[str]:
    """``images`` noise PNGs directly in ``root``, every ``bad_every``-th cut in half; the cut names."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    cut = []
    for i in range(images):
        bad = i % bad_every == 1
        path = root / f"{'bad' if bad else 'img'}_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        if bad:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            cut.append(path.name)
    return cut


@pytest.fixture(scope="module")
def damaged_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged") / "photos"
    assert len(_write_folder(root, 32, bad_every=4)) == 8
    (root / "README.txt").write_text("my photos")
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY)
    return path


def _pretrain(recipe: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), str(recipe), f"run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


def _epoch_counts(folder: Path, workers: int):
    loader, sampler = build_loader(
        ImageFolderSource(folder), 4, 8, rank=0, world_size=1, seed=0, workers=workers, pin_memory=False
    )
    sampler.set_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        sizes = [len(batch["image"]) for batch in loader]
    assert sizes == [4, 4, 4, 4]  # the whole epoch, every batch full
    return sampler


def test_the_training_loader_counts_bad_images_from_two_workers(tmp_path):
    cut = _write_folder(tmp_path, 16, bad_every=4)
    sampler = _epoch_counts(tmp_path, workers=2)
    good, bad = sampler.counts()
    # all 16 delivered; each cut image read at least once, plus any replacement draw that hit one
    assert good == 16 and bad >= len(cut) == 4
    assert (good, bad) == _epoch_counts(tmp_path, workers=0).counts()  # workers add to the same counts
    assert _data_counts(sampler, ONE, 0.5, step=2) == {"samples_read": good, "bad_samples": bad}
    with pytest.raises(BadDataError, match=rf"{bad} of {good + bad} samples read by step 2"):
        _data_counts(sampler, ONE, 0.1, step=2)


def test_a_source_without_counts_logs_none():
    _, sampler = build_loader(list(range(8)), 4, 8, rank=0, world_size=1, seed=0, workers=0, pin_memory=False)
    assert sampler.counts() is None and _data_counts(sampler, ONE, 0.0, step=1) == {}


class _Counts:
    def __init__(self, good: int, bad: int):
        self.good, self.bad = good, bad

    def counts(self) -> tuple[int, int]:
        return self.good, self.bad


def test_the_bad_share_is_judged_once_one_bad_sample_cannot_pass_it_alone():
    # at 1%, one bad sample among the first 99 would be past the share by itself: not judged yet
    assert _data_counts(_Counts(20, 1), ONE, 0.01, step=1) == {"samples_read": 20, "bad_samples": 1}
    with pytest.raises(BadDataError):
        _data_counts(_Counts(98, 2), ONE, 0.01, step=9)
    with pytest.raises(BadDataError):  # a fraction of 0 tolerates nothing, from the first sample
        _data_counts(_Counts(3, 1), ONE, 0.0, step=1)


def test_the_message_is_the_same_for_every_source_and_names_key_and_warnings():
    with pytest.raises(BadDataError) as info:
        _data_counts(_Counts(90, 10), ONE, 0.05, step=7)
    message = str(info.value)
    assert "10 of 100 samples read by step 7" in message and "10.00% > data.max_bad_fraction=0.05" in message
    assert "images" in message and "shards" in message  # one message whatever the source
    assert "BadSampleWarning lines above name each file" in message
    assert "raise data.max_bad_fraction" in message


def test_pretraining_on_an_unlabelled_folder_logs_its_bad_images(recipe, damaged_folder, tmp_path):
    run = tmp_path / "run"
    overrides = (f"data.source=folder:{damaged_folder}", "data.max_bad_fraction=0.5", "train.max_steps=3")
    proc = _pretrain(recipe, run, *overrides)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "finished" in proc.stdout and (run / "encoder.safetensors").is_file()
    assert "ignored 1 non-image file" in proc.stderr and "README.txt" in proc.stderr
    assert ": BadSampleWarning: cannot decode image file" in proc.stderr and "bad_" in proc.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    last = metrics[-1]
    assert last["samples_read"] == 3 * 8 and 0 < last["bad_samples"] < last["samples_read"]
    assert [m["bad_samples"] for m in metrics] == sorted(m["bad_samples"] for m in metrics)


def test_too_many_bad_images_stop_the_run_naming_the_key_and_the_files(recipe, damaged_folder, tmp_path):
    overrides = (f"data.source=folder:{damaged_folder}", "data.max_bad_fraction=0.05", "train.max_steps=4")
    proc = _pretrain(recipe, tmp_path / "run", *overrides)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "pretrain: training stopped:" in proc.stderr and "> data.max_bad_fraction=0.05" in proc.stderr
    named = [line for line in proc.stderr.splitlines() if ": BadSampleWarning: " in line]
    assert named and all("bad_" in line and ".png" in line for line in named)
    assert "finished" not in proc.stdout
