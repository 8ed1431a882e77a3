"""Shared test plumbing."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# set by init_distributed in this pytest process; a child would inherit a port that is taken
PROCESS_GROUP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """The environment for a child that runs a tool: no inherited process group, this checkout, 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return env


def tiny_mae_recipe(steps: int) -> str:
    """The tiny MAE the end-to-end trainer tests run, as recipe YAML.

    ``vit_tiny`` cut to depth 2 at 32 px (16 patches), a 32-wide, 1-deep decoder; micro batch 4,
    global batch 8 (one process accumulates 2 micro-batches), so 32 images make a 4-step epoch.
    """
    return f"""\
defaults: {REPO / "recipes" / "mae" / "default.yaml"}
method:
  backbone: {{name: vit_tiny_patch16, img_size: 32, patch_size: 8, depth: 2}}
  decoder_dim: 32
  decoder_depth: 1
  decoder_heads: 2
data: {{source: "synthetic:shapes?size=32&train=32&val=8", workers: 0}}
optim: {{lr: 1.0e-3, warmup_epochs: 1}}
batch: {{global_size: 8, micro_size: 4}}
train: {{epochs: 3, max_steps: {steps}, precision: fp32, zero_stage: 0}}
run: {{log_every: 1, checkpoint_every: 2, progress: false}}
"""
