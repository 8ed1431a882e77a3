"""The evaluation tools' --workers default: no loader processes on the CPU, up to 8 beside a GPU."""

import argparse
import os

import pytest
import torch

from mimkit.eval import common


def _default_workers(monkeypatch, cuda: bool, cpus: int) -> int:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    parser = argparse.ArgumentParser()
    common.add_eval_args(parser)
    return parser.parse_args(["--encoder", "e", "--train", "synthetic:shapes"]).workers


@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_no_workers_without_a_gpu(monkeypatch, cpus):
    assert _default_workers(monkeypatch, cuda=False, cpus=cpus) == 0


@pytest.mark.parametrize("cpus, workers", [(1, 1), (2, 2), (8, 8), (64, 8)])
def test_usable_cpus_up_to_8_with_a_gpu(monkeypatch, cpus, workers):
    assert _default_workers(monkeypatch, cuda=True, cpus=cpus) == workers


def test_help_states_the_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    common.add_eval_args(parser)
    assert "0 without a CUDA device" in " ".join(parser.format_help().split())
