"""DeepSpeed checkpoints that a crash cannot damage, plus the random state needed to resume exactly.

Layout of ``RUN/checkpoints``::

    step00000200/          one DeepSpeed checkpoint (model, optimizer, ZeRO shards, client state)
      rng_rank0.pt ...     python / numpy / torch / cuda random states of every rank
    step00000400/
    latest                 the tag of the newest *complete* checkpoint

A checkpoint is written under its own tag; ``latest`` is replaced atomically (temporary file +
rename) only after every rank has finished writing, so a process killed mid-save leaves the
previous checkpoint as the one that resumes. Older complete checkpoints beyond ``keep`` and
leftovers of interrupted saves are deleted afterwards. ``latest`` has DeepSpeed's own format, so
DeepSpeed's tools (``zero_to_fp32.py``) read the directory as they are.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit.files import atomic_write, atomic_write_text

LATEST = "latest"
_TAG = re.compile(r"^step(\d{8,})$")


def tag_for(step: int) -> str:
    """The checkpoint tag of optimizer step ``step``."""
    return f"step{step:08d}"


def _tag_step(name: str) -> int | None:
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names, if it names a directory that exists."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    atomic_write_text(ckpt_dir / LATEST, tag, sync=True)


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    rank: int,
    keep: int,
    fail_midway: bool = False,
    protect: tuple[str, ...] = (),
) -> str:
    """Save step ``step`` on every rank, then publish it as ``latest``; returns its tag.

    ``protect`` names checkpoints that pruning keeps besides the ``keep`` newest (the best one).
    ``fail_midway`` (a test hook) kills the process after the files are written but before
    ``latest`` moves, with the model file truncated as a crash mid-write would leave it.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if (ckpt_dir / tag).exists():  # leftover of a save that was interrupted
            shutil.rmtree(ckpt_dir / tag)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    state = rng_state()
    atomic_write(ckpt_dir / tag / f"rng_rank{rank}.pt", lambda tmp: torch.save(state, tmp))
    if fail_midway:
        for path in (ckpt_dir / tag).rglob("*model_states.pt"):
            with open(path, "r+b") as f:
                f.truncate(max(path.stat().st_size // 2, 1))
        os._exit(137)
    _barrier()
    if rank == 0:
        _write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep, protect)
    _barrier()
    return tag


def prune(ckpt_dir: Path, keep: int, protect: tuple[str, ...] = ()) -> None:
    """Keep the ``keep`` newest complete checkpoints and those ``protect`` names; delete the rest
    and unfinished saves."""
    latest = latest_tag(ckpt_dir)
    if latest is None:
        return
    newest = _tag_step(latest)
    steps = sorted(s for p in ckpt_dir.iterdir() if p.is_dir() and (s := _tag_step(p.name)) is not None)
    complete = [s for s in steps if s <= newest]
    doomed = [s for s in steps if s > newest] + complete[:-keep]
    for s in (s for s in doomed if tag_for(s) not in protect):
        shutil.rmtree(ckpt_dir / tag_for(s), ignore_errors=True)


def load(
    engine, ckpt_dir: str | Path, rank: int, tag: str | None = None, restore_rng: bool = True
) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint (or ``tag``) into ``engine``, and this rank's random state.

    Returns the client state saved with it, or None when there is nothing to resume.
    """
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return {**client_state, "tag": tag}


def consolidated_state_dict(
    engine, ckpt_dir: str | Path, tag: str, rank: int
) -> dict[str, torch.Tensor] | None:
    """The whole model in fp32 on CPU on rank 0 (None elsewhere); every rank must call this.

    With 16-bit training the fp32 master weights live in the optimizer: under ZeRO DeepSpeed's
    ``zero_to_fp32`` reassembles them from checkpoint ``tag``; without ZeRO they are read from the
    optimizer's fp32 groups (or gathered from the BF16 optimizer's partitions, a collective). A plain
    fp32 engine's module holds them already. Parameters the optimizer does not hold (frozen ones)
    come from the module.
    """
    module_state = engine.module.state_dict() if rank == 0 else {}
    if engine.zero_optimization():
        state = None
        if rank == 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from mimkit.train.distributed import quiet

            with quiet():
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    elif hasattr(engine.optimizer, "fp16_groups"):  # DeepSpeed's fp16 optimizers, also bf16 without ZeRO
        state = _fp16_master_weights(engine)
    elif engine.bfloat16_enabled() or engine.fp16_enabled():
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # all-reduces over data-parallel ranks
            if full is not None:
                state[name] = full
    else:
        state = {}
    if rank != 0:
        return None
    state = {**{k: v for k, v in module_state.items() if k not in state}, **state}
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}


def _fp16_master_weights(engine) -> dict[str, torch.Tensor]:
    """fp32 copies held by DeepSpeed's fp16 optimizers (fused: flat groups; unfused: per tensor)."""
    from torch._utils import _unflatten_dense_tensors

    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    state = {}
    for i, group in enumerate(opt.fp16_groups):
        if hasattr(opt, "fp32_groups_flat"):
            masters = _unflatten_dense_tensors(opt.fp32_groups_flat[i], group)
        else:
            masters = opt.fp32_groups[i]
        state.update({names[id(p)]: m for p, m in zip(group, masters)})
    return state


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
