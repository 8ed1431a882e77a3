"""``benchmark.py pipeline``: the pre-decoded source, the steady-speed arithmetic and a tiny real run.

The run trains ``vit_tiny`` cut to depth 1 at 32 px with a 16-wide decoder on synthetic shapes for
4 steps (log every 2, so one window is dropped and one timed) per worker count and data kind, in a
separate process through ``tools/benchmark.py`` (the trainer brings up a process group that
outlives the run, so it stays out of the test process).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import pipeline
from mimkit.data import build_source, build_transform
from tests.helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "benchmark.py"
SOURCE = "synthetic:shapes?size=32&train=64&val=8"

TINY = f"""\
defaults: {REPO / "recipes" / "demo" / "mae_vit_tiny.yaml"}
method:
  backbone: {{name: vit_tiny_patch16, img_size: 32, patch_size: 8, depth: 1}}
  decoder_dim: 16
  decoder_depth: 1
  decoder_heads: 2
data: {{source: "{SOURCE}", workers: 0}}
batch: {{global_size: 8, micro_size: 8}}
train: {{epochs: 2}}
"""


def test_predecoded_source_serves_the_stored_samples_cyclically():
    uri = pipeline.predecode(SOURCE, "train", "pretrain", 32, samples=5, seed=3)
    try:
        dataset = build_source(uri, "train", build_transform("pretrain", 32))
        assert len(dataset) == 64  # the real source's length: epochs as long as the real run's
        real = build_source(SOURCE, "train", build_transform("pretrain", 32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            expected = [real[i] for i in range(5)]
        for index in (0, 4, 5, 12, 63):
            sample = dataset[index]
            assert sample.keys() == expected[0].keys()
            for key in sample:
                assert torch.equal(sample[key], expected[index % 5][key]), (index, key)
    finally:
        pipeline.release(uri)
    with pytest.raises(ValueError, match="no pre-decoded samples under predecoded:"):
        build_source(uri, "train")


def test_steady_speed_drops_the_first_window_and_weights_by_time():
    metrics = [
        {"step": 2, "images_per_s": 1.0},  # start-up: dropped
        {"step": 4, "images_per_s": 50.0},
        {"step": 10, "images_per_s": 100.0},
    ]
    speed, steps = pipeline.steady_images_per_s(metrics, global_batch=8)
    # 16 images in 0.32 s and 48 images in 0.48 s: 64 images in 0.8 s
    assert steps == 8 and speed == pytest.approx(80.0)
    with pytest.raises(ValueError, match="need 2 or more"):
        pipeline.steady_images_per_s(metrics[:1], global_batch=8)


def test_too_few_steps_for_a_timed_window_is_an_error(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    with pytest.raises(ValueError, match="--steps=4 must be at least twice --log-every=3"):
        pipeline.benchmark_pipeline(str(recipe), [0], steps=4, log_every=3)


def test_pipeline_tool_tiny_run(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    out = tmp_path / "pipeline.json"
    env = subprocess_env()
    cmd = [sys.executable, str(TOOL), "pipeline", str(recipe), "--workers", "1", "0", "--steps", "4"]
    cmd += ["--log-every", "2", "--predecoded-samples", "16", "--set", "optim.lr=1e-3"]
    cmd += ["--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "real_images_per_s" in proc.stdout  # the table
    assert json.loads(proc.stdout.splitlines()[-1]) == json.loads(out.read_text())  # the JSON line

    res = json.loads(out.read_text())
    assert res["benchmark"] == "pipeline" and res["source"] == SOURCE
    assert res["recipe_workers"] == 0 and res["global_batch"] == 8 and res["img_size"] == 32
    assert res["options"]["set"] == ["optim.lr=1e-3"] and res["options"]["steps"] == 4
    assert res["machine"]["cpu_count"] >= 1 and "torch" in res["machine"]
    assert res["predecoded"]["samples"] == 16 and res["predecoded"]["bytes"] > 16 * 3 * 32 * 32 * 4 - 1
    rows = res["results"]
    assert [r["workers"] for r in rows] == [0, 1]
    assert [r["default"] for r in rows] == [True, False]
    for r in rows:
        assert r["real_images_per_s"] > 0 and r["predecoded_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["real_images_per_s"] / r["predecoded_images_per_s"])
        assert r["data_share"] == pytest.approx(1 - r["ratio"])
        assert r["timed_steps"] == 2  # 4 steps, the first window of 2 dropped
        assert r["real_wall_s"] > 0 and r["predecoded_wall_s"] > 0
        assert len(r["real_windows"]) == len(r["predecoded_windows"]) == 1
        assert r["real_windows"][0] == pytest.approx(r["real_images_per_s"], rel=1e-3)
        assert r["real_load_1m_after"] >= 0 and r["predecoded_load_1m_after"] >= 0


def test_add_args_defaults():
    parser = argparse.ArgumentParser()
    pipeline.add_args(parser)
    args = parser.parse_args(["r.yaml"])
    assert args.workers is None and args.set == [] and args.steps >= 2 * args.log_every
