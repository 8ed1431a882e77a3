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
