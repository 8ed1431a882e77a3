"""``benchmark.py extract`` at tiny sizes, through its ``run``: extraction and forward-pass rates per row."""

import argparse
import json

import torch

from benchmarks import extract
from mimkit.models import create_backbone, save_backbone


def _args(argv: list[str]) -> argparse.Namespace:
    # what tools/benchmark.py builds: the module's options plus --json and --no-progress
    parser = argparse.ArgumentParser()
    extract.add_args(parser)
    parser.add_argument("--json")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args([*argv, "--no-progress"])


def test_extract_sets_each_source_against_the_forward_pass_with_the_baseline_beside(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    export = save_backbone(model, tmp_path / "tiny").parent
    argv = ["--encoder", str(export), "--images", "12", "--batch-size", "6", "--workers", "0",
            "--repeat", "2", "--sources", "synthetic:shapes", "folder"]  # fmt: skip
    res = json.loads(json.dumps(extract.run(_args(argv))))  # JSON-ready
    rows = res["results"]
    assert [(r["source"].split(" ")[0], r["loader"]) for r in rows] == [
        ("synthetic:shapes", "prefetch thread"), ("synthetic:shapes", "before: calling thread, with masks"),
        ("folder", "prefetch thread"), ("folder", "before: calling thread, with masks"),
    ]  # fmt: skip
    for r in rows:
        assert r["extract_images_per_s"] > 0 and r["forward_images_per_s"] > 0
        ratio = r["extract_images_per_s"] / r["forward_images_per_s"]  # of the rounded rates
        assert abs(r["of_forward"] - ratio) < 0.01 * ratio + 0.002
        low, high = r["of_forward_per_round"]["range"]
        assert low <= r["of_forward_per_round"]["median"] <= high
    assert res["options"]["img_size"] == 32 and "of_forward" in capsys.readouterr().out
