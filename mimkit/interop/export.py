"""Export a mimkit encoder for timm: a state dict ``timm.create_model`` loads strictly, plus a JSON.

The JSON names the timm model, the keyword arguments that give it mimkit's shape, and the
preprocessing (mean, std, input size), so downstream code needs nothing else::

    cfg = json.load(open("timm.json"))
    model = timm.create_model(cfg["timm_model"], **cfg["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("timm.safetensors"), strict=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.layers import LayerScale
from torch import nn

from mimkit.data.transforms import Normalization
from mimkit.files import atomic_write, atomic_write_text
from mimkit.models import Backbone

TIMM_WEIGHTS = "timm.safetensors"
TIMM_CONFIG = "timm.json"


def export_timm(encoder: Backbone) -> dict[str, torch.Tensor]:
    """The encoder's weights as a state dict for ``timm.create_model(<timm name>, num_classes=0)``.

    mimkit's keys are timm's, so this is a detached, contiguous CPU copy; it is checked against
    the timm model in the tests, and :func:`load_timm_export` loads it with ``strict=True``.
    """
    if not isinstance(encoder, Backbone):
        raise TypeError(f"export_timm needs a mimkit Backbone, got {type(encoder).__name__}")
    return {k: v.detach().cpu().clone().contiguous() for k, v in encoder.state_dict().items()}


def timm_model_args(encoder: Backbone) -> dict[str, Any]:
    """``{"timm_model": name, "timm_kwargs": {...}}`` that build a timm model of the encoder's shape."""
    cfg = encoder.config
    kwargs = {
        "num_classes": 0,
        "img_size": list(cfg["img_size"]),
        "patch_size": cfg["patch_size"],
        "in_chans": cfg["in_chans"],
        "embed_dim": cfg["embed_dim"],
        "depth": cfg["depth"],
        "num_heads": cfg["num_heads"],
        "mlp_ratio": cfg["mlp_ratio"],
        "qkv_bias": cfg["qkv_bias"],
    }
    if isinstance(encoder.blocks[0].ls1, LayerScale):
        kwargs["init_values"] = cfg.get("init_values") or 1.0
    return {"timm_model": encoder.timm_name, "timm_kwargs": kwargs}


def timm_export_config(encoder: Backbone) -> dict[str, Any]:
    """The export JSON: timm model and arguments, preprocessing, and where it came from."""
    h, w = encoder.config["img_size"]
    return {
        "format": "mimkit-timm-export-v1",
        **timm_model_args(encoder),
        "weights": TIMM_WEIGHTS,
        "preprocessing": {
            "input_size": [encoder.in_chans, h, w],
            **Normalization.from_dict(encoder.normalization, encoder.in_chans).to_dict(),
            "interpolation": "bicubic",
        },
        "mimkit": encoder.config,
    }


def save_timm_export(encoder: Backbone, directory: str | os.PathLike) -> Path:
    """Write ``timm.safetensors`` + ``timm.json`` into ``directory``; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = export_timm(encoder)
    atomic_write(directory / TIMM_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(directory / TIMM_CONFIG, json.dumps(timm_export_config(encoder), indent=2))
    return directory / TIMM_CONFIG


def load_timm_export(directory: str | os.PathLike) -> nn.Module:
    """Build the timm model an export names and load its weights with ``strict=True``."""
    import timm

    directory = Path(directory)
    config = json.loads((directory / TIMM_CONFIG).read_text())
    kwargs = dict(config["timm_kwargs"])
    kwargs["img_size"] = tuple(kwargs["img_size"])
    model = timm.create_model(config["timm_model"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(directory / config["weights"])), strict=True)
    return model.eval()
