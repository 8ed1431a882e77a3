"""Safe reading of checkpoint files: tensors only, never arbitrary pickled objects.

``.safetensors`` files are read with safetensors; anything else with
``torch.load(..., weights_only=True)``, which refuses any pickled object that is not a tensor,
a container or a plain value. ``argparse.Namespace`` is the one class allowed besides, because
the official MAE and CAE training checkpoints store their command line in ``args``; it only
holds attributes, so restoring it runs no code.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

# Wrappers the official repositories put around the state dict, in the order they are tried.
WRAPPER_KEYS = ("model", "state_dict", "module", "model_state")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message names the file and the reason."""


def read_tensors(path: str | os.PathLike) -> dict:
    """The raw object of a checkpoint file, read safely (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise CheckpointError(f"{path} is not a safetensors checkpoint: {err}") from err
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); the legacy format is a raw pickle (protocol >= 2).
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
        raise CheckpointError(
            f"{path} is not a checkpoint (expected a torch .pth/.pt file or a .safetensors file; "
            f"it starts with {head!r})"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it pickles objects other than tensors and plain values, and "
            f"mimkit only reads checkpoints with torch.load(weights_only=True). torch said: "
            f"{str(err).splitlines()[0]}"
        ) from err
    except Exception as err:  # torch raises many types (RuntimeError, KeyError, EOFError) on a bad file
        raise CheckpointError(
            f"{path} is not a checkpoint (expected a torch .pth/.pt file or a .safetensors file): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint object.

    Unwraps ``model`` / ``state_dict`` / ``module`` / ``model_state`` (nested ones too), strips a
    DistributedDataParallel ``module.`` prefix, and keeps only tensors (a state dict can hold
    non-tensor extras, e.g. timm's ``_metadata``).
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of tensors)"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"{source} holds no tensors; top-level keys: {', '.join(map(str, list(obj)[:20])) or '(none)'} "
            f"(a state dict is expected, possibly under one of {', '.join(WRAPPER_KEYS)})"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its tensor state dict."""
    return unwrap_state_dict(read_tensors(path), source=str(path))
