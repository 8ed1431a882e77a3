"""Pretraining on ``wds:`` shards through tools/pretrain.py: exact epochs, bad data, two ranks.

The model and batch sizes are test_pretrain.py's (ViT-Ti cut to depth 2 at 32 px, global batch
8, micro batch 4); the data are 32 synthetic images written as 8 shards of 4, and in each shard
the image of one sample is replaced by garbage, so a quarter of all samples read are bad.
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from mimkit.data import write_shards
from mimkit.train.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "pretrain.py"

TINY = f"""\
defaults: {REPO / "recipes" / "mae" / "default.yaml"}
method:
  backbone: {{name: vit_tiny_patch16, img_size: 32, patch_size: 8, depth: 2}}
  decoder_dim: 32
  decoder_depth: 1
  decoder_heads: 2
data: {{source: "wds:SHARDS/train-index.json?shuffle=8", workers: 1, max_bad_fraction: 0.5}}
optim: {{lr: 1.0e-3, warmup_epochs: 1}}
batch: {{global_size: 8, micro_size: 4}}
train: {{epochs: 2, max_steps: 6, precision: fp32, zero_stage: 0}}
run: {{log_every: 1, checkpoint_every: 3, progress: false}}
"""


def _env() -> dict:
    from tests.train.test_pretrain import _env as pretrain_env

    return pretrain_env()


def _corrupt_one_image(shard: Path) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png") and ".seg." not in m.name]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            data = b"garbage" if i == images[1] else data  # the image of the shard's second sample
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    shards = root / "shards"
    write_shards("synthetic:shapes?size=32&train=32&val=8", shards, shard_size=4, progress=False)
    for shard in sorted(shards.glob("*.tar")):
        _corrupt_one_image(shard)
    path = root / "tiny_wds.yaml"
    path.write_text(TINY.replace("SHARDS", str(shards)))
    return path


def _run(cmd: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert (proc.returncode == 0) == (expect == 0), f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bad_samples_are_skipped_counted_and_logged(recipe, tmp_path):
    run = tmp_path / "run"
    proc = _run([sys.executable, str(TOOL), str(recipe), f"run.dir={run}"])
    assert "finished" in proc.stdout and "cannot be decoded" in proc.stderr
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # the epoch length comes from the index
    assert [m["epoch"] for m in metrics][3] == 1.0  # 32 samples / global batch 8 = 4 steps per epoch
    last = metrics[-1]
    assert last["samples_read"] >= 6 * 8 and 0 < last["bad_samples"] < last["samples_read"]
    bad = [m["bad_samples"] for m in metrics]
    assert bad == sorted(bad)  # a running count

    # resuming (max_steps raised past the finished run) goes on into the next epoch's stream
    proc = _run([sys.executable, str(TOOL), str(recipe), f"run.dir={run}", "train.max_steps=8"])
    assert "resumed at step 6" in proc.stdout
    assert [m["step"] for m in _metrics(run)] == list(range(1, 9))


class _Counts:
    def __init__(self, good, bad):
        self.good, self.bad = good, bad

    def counts(self):
        return self.good, self.bad


def test_too_many_bad_samples_stop_the_run():
    from mimkit.train.distributed import Dist
    from mimkit.train.trainer import BadDataError, _data_counts

    one = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert _data_counts(_Counts(99, 1), one, 0.01, step=5) == {"samples_read": 99, "bad_samples": 1}
    with pytest.raises(BadDataError, match=r"2 of 100 samples read by step 5.*data.max_bad_fraction=0.01"):
        _data_counts(_Counts(98, 2), one, 0.01, step=5)
    assert _data_counts(object(), one, 0.0, step=5) == {}  # a map-style source has no counts


@pytest.mark.slow
def test_two_ranks_gloo_on_shards(recipe, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(TOOL),
        str(recipe),
        f"run.dir={run}",
        "train.max_steps=3",
    ]
    proc = _run(cmd)
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("finished") == 1
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["samples_read"] >= 3 * 8 and metrics[-1]["bad_samples"] > 0  # summed over ranks
    assert (run / "encoder.safetensors").is_file()


def test_recipe_checks_the_index_and_the_bad_fraction(recipe, tmp_path):
    from mimkit.train import RecipeError, load_recipe

    r = load_recipe(recipe)
    assert r.data.max_bad_fraction == 0.5 and r.data.source.startswith("wds:")
    with pytest.raises(RecipeError, match=r"shard index .*nope-index.json.*does not exist.*make_shards"):
        load_recipe(recipe, [f"data.source=wds:{tmp_path}/nope-index.json"])
    with pytest.raises(RecipeError, match=r"data.max_bad_fraction must be a fraction in \[0, 1\], got 1.5"):
        load_recipe(recipe, ["data.max_bad_fraction=1.5"])
