"""Safe checkpoint reading: tensors only; arbitrary pickled objects and non-checkpoints are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mimkit.interop import CheckpointError, read_state_dict


class Payload:
    """An arbitrary object whose unpickling would run code (touch a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Plain:
    """An arbitrary, harmless class instance: still not allowed."""

    def __init__(self):
        self.value = 3


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth.*weights_only"):
        read_state_dict(path)
    assert not marker.exists()


def test_pickle_with_an_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Plain()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_state_dict(path)


def test_training_checkpoint_with_args_namespace_loads(tmp_path):
    path = tmp_path / "train.pth"
    state = {"blocks.0.w": torch.randn(3)}
    torch.save({"model": state, "epoch": 7, "args": argparse.Namespace(lr=1e-3, model="mae")}, path)
    got = read_state_dict(path)
    assert got.keys() == state.keys() and torch.equal(got["blocks.0.w"], state["blocks.0.w"])


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module", None])
def test_wrappers_and_ddp_prefix_are_unwrapped(tmp_path, wrapper):
    inner = {"module.cls_token": torch.randn(1, 1, 4), "module.norm.weight": torch.ones(4)}
    path = tmp_path / "w.pth"
    torch.save(inner if wrapper is None else {wrapper: inner, "epoch": 1}, path)
    got = read_state_dict(path)
    assert sorted(got) == ["cls_token", "norm.weight"]
    assert torch.equal(got["cls_token"], inner["module.cls_token"])


def test_safetensors_is_read(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(4.0)}, str(path))
    assert torch.equal(read_state_dict(path)["a"], torch.arange(4.0))


@pytest.mark.parametrize(
    "name, content", [("notes.pth", b"just some text\n"), ("bad.safetensors", b"\x00\x01garbage")]
)
def test_a_file_that_is_not_a_checkpoint_gives_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{name} is not a .*checkpoint"):
        read_state_dict(path)


def test_a_checkpoint_without_tensors_is_named(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="holds no tensors; top-level keys: epoch, lr"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth not found"):
        read_state_dict(tmp_path / "nope.pth")
