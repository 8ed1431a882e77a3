"""The GPU path: every method's bf16 and fp16 steps, NCCL, resume and fused attention on CUDA.

Marked ``gpu`` and skipped where no CUDA device is visible (CI has none); ``benchmarks/gpu_check.sh``
runs them first when a GPU is lent. Each trainer-path step goes through the same
``build_engine`` as ``tools/pretrain.py``.
"""

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from benchmarks.step import TrainerPath, build_recipe
from mimkit.ssl import build_method, list_methods
from tests.helpers import REPO, subprocess_env
from tests.train.test_pretrain import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEMO = REPO / "recipes" / "demo" / "mae_vit_tiny.yaml"


@pytest.fixture(scope="module")
def dist():
    from mimkit.train.distributed import init_distributed

    return init_distributed()


def _args(**overrides) -> argparse.Namespace:
    base = dict(recipe=str(DEMO), backbone="vit_tiny_patch16", img_size=64, batch=8, compile=False)
    base.update(zero_stage=0, set=[])
    return argparse.Namespace(**(base | overrides))


def test_one_process_joins_an_nccl_group_on_the_gpu(dist):
    assert dist.device.type == "cuda"
    assert torch.distributed.get_backend() == "nccl"
    assert torch.distributed.get_world_size() == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list_methods())
def test_every_method_steps_with_finite_losses(dist, method, precision):
    # these batches hold images only; painter's mask-rendering tasks need a source with masks
    sets = ["method.tasks=[edges, identity]"] if method == "painter" else []
    recipe = build_recipe(method, _args(set=sets), precision)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dist.device)
    path = TrainerPath(recipe, dist, images)
    losses = [path.step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in path.module.parameters())


def test_checkpointed_step_matches_in_loss_and_uses_less_memory(dist):
    used = {}
    for checkpointed in (False, True):
        args = _args(batch=32, set=[f"train.grad_checkpointing={str(checkpointed).lower()}"])
        recipe = build_recipe("mae", args, "bf16")
        images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dist.device)
        path = TrainerPath(recipe, dist, images)
        path.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        path.step()
        used[checkpointed] = torch.cuda.max_memory_allocated()
    assert used[True] < used[False], used


def test_flash_or_memory_efficient_attention_runs_the_encoder(dist):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    method = build_method({"name": "mae", "backbone": {"name": "vit_base_patch16", "img_size": 224}})
    method = method.to(dist.device).train()
    images = torch.randn(4, 3, 224, 224, device=dist.device)
    # only the fused kernels are allowed: the math fallback would raise "no available kernel"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method({"image": images})["loss"]
        loss.backward()
    assert torch.isfinite(loss)


def test_kill_and_resume_on_the_gpu(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("precision: fp32", "precision: bf16"))
    tool = str(REPO / "tools" / "pretrain.py")
    run = tmp_path / "run"
    env = subprocess_env()
    killed = subprocess.run([sys.executable, tool, str(recipe), f"run.dir={run}", "debug.kill_after_step=3"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert killed.returncode != 0
    resumed = subprocess.run([sys.executable, tool, str(recipe), f"run.dir={run}"],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2" in resumed.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(m["loss"]) for m in metrics)
