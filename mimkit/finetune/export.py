"""The fine-tuned classifier as timm reads it: ``classifier.safetensors`` + ``classifier.json``.

The weights are keyed as timm's ``VisionTransformer`` classifier of the same pooling, so::

    cfg = json.load(open("classifier.json"))
    model = timm.create_model(cfg["timm_model"], **cfg["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("classifier.safetensors"), strict=True)

builds it without mimkit (:func:`load_classifier` does exactly this). With ``global_pool: avg``
timm's model has ``fc_norm`` and no final ``norm``, so the encoder's unused ``norm`` is left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mimkit.data.transforms import Normalization
from mimkit.files import atomic_write, atomic_write_text
from mimkit.interop.export import timm_model_args

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


def classifier_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The timm-keyed state dict of a :class:`~mimkit.finetune.classifier.FineTune` (CPU copies)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            key = key[len("encoder.") :]
            if model.global_pool == "avg" and key.startswith("norm."):
                continue
        state[key] = value.detach().to("cpu").clone().contiguous()
    return state


def classifier_config(model: nn.Module, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON: the timm model and its arguments, preprocessing, and where the weights came from."""
    encoder = model.encoder
    args = timm_model_args(encoder)
    args["timm_kwargs"].update(num_classes=model.num_classes, global_pool=model.global_pool)
    h, w = encoder.config["img_size"]
    norm = Normalization.from_dict(encoder.normalization, encoder.in_chans)
    return {
        "format": "mimkit-classifier-v1",
        **args,
        "weights": CLASSIFIER_WEIGHTS,
        "num_classes": model.num_classes,
        "preprocessing": {
            "input_size": [encoder.in_chans, h, w],
            **norm.to_dict(),
            "interpolation": "bicubic",
        },
        "mimkit": encoder.config,
        "trained": provenance or {},
    }


def save_classifier(model: nn.Module, directory: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = classifier_state(model)
    weights = directory / CLASSIFIER_WEIGHTS
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    config = classifier_config(model, provenance)
    atomic_write_text(directory / CLASSIFIER_CONFIG, json.dumps(config, indent=2))
    return weights


def load_classifier(directory: str | os.PathLike) -> nn.Module:
    """The timm classifier an export describes, its weights loaded strictly, in eval mode."""
    import timm

    directory = Path(directory)
    config_path = directory / CLASSIFIER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; is {directory} a fine-tuning run (or its best/)?")
    config = json.loads(config_path.read_text())
    kwargs = dict(config["timm_kwargs"])
    kwargs["img_size"] = tuple(kwargs["img_size"])
    model = timm.create_model(config["timm_model"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(directory / config["weights"])), strict=True)
    return model.eval()
