"""``benchmark.py data`` at tiny sizes, through its ``run``: images/s rows and the class-mix rows."""

import argparse
import json

import pytest

from benchmarks import data
from mimkit.data import write_shards


def _args(argv: list[str]) -> argparse.Namespace:
    # what tools/benchmark.py builds: the module's options plus --json and --no-progress
    parser = argparse.ArgumentParser()
    data.add_args(parser)
    parser.add_argument("--json")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args([*argv, "--no-progress"])


def test_speed_and_diversity_rows(tmp_path, capsys):
    write_shards("synthetic:shapes?size=32&train=32", tmp_path, shard_size=8, progress=False)
    speed = [f"wds:{tmp_path}/train-index.json", "--workers", "0", "--images", "16", "--batch", "4"]
    speed += ["--img-size", "32", "--repeat", "1"]
    diversity = ["--diversity", "--diversity-classes", "4", "--diversity-per-class", "8"]
    diversity += ["--diversity-shard-size", "8", "--diversity-shuffle", "8", "--diversity-batch", "4"]
    res = json.loads(json.dumps(data.run(_args([*speed, *diversity, "--diversity-batches", "5"]))))
    assert [r["workers"] for r in res["results"]] == [0] and res["results"][0]["images_per_s"] > 0
    assert [(r["written"], r["batch"]) for r in res["diversity"]] == [("shuffled", 4), ("source", 4)]
    for r in res["diversity"]:
        assert 1 <= r["distinct_per_batch"] <= 4
        assert r["random_permutation"] == pytest.approx(data.expected_distinct_labels([8] * 4, 4), abs=0.01)
        assert r["ratio"] == pytest.approx(r["distinct_per_batch"] / r["random_permutation"], abs=0.01)
    assert "random permutation" in capsys.readouterr().out


def test_nothing_to_measure_is_an_error():
    with pytest.raises(ValueError, match="sources to time, --diversity"):
        data.run(_args([]))


def test_against_tree_alternates_two_checkouts_and_reports_each_pairs_ratio(tmp_path, capsys):
    import statistics
    from pathlib import Path

    write_shards("synthetic:shapes?size=32&train=32", tmp_path, shard_size=8, progress=False)
    repo = Path(data.__file__).resolve().parents[1]
    argv = [f"wds:{tmp_path}/train-index.json", "--workers", "0", "--images", "8", "--batch", "4"]
    argv += ["--img-size", "32", "--against-tree", str(repo), "--pairs", "3"]
    res = json.loads(json.dumps(data.run(_args(argv))))
    assert res["against_tree"] == str(repo) and res["options"]["pairs"] == 3
    (row,) = res["results"]
    assert len(row["against_images_per_s"]) == len(row["this_images_per_s"]) == 3
    assert all(v > 0 for v in row["against_images_per_s"] + row["this_images_per_s"])
    ratios = [mine / theirs for theirs, mine in zip(row["against_images_per_s"], row["this_images_per_s"])]
    assert row["ratios"] == pytest.approx(ratios, abs=1e-3)
    assert row["median_ratio"] == pytest.approx(statistics.median(ratios), abs=1e-3)
    assert "median" in capsys.readouterr().out


def test_against_tree_without_the_benchmark_is_refused_before_timing(tmp_path):
    argv = ["synthetic:shapes?size=32&train=8", "--against-tree", str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="has no benchmarks/data.py"):
        data.run(_args(argv))
    with pytest.raises(ValueError, match="--pairs must be at least 1, got 0"):
        data.run(_args([*argv, "--pairs", "0"]))
