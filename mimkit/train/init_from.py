"""``train.init_from``: start a run from an exported or converted encoder instead of a random init.

The weights are loaded into the method's ``encoder`` before the DeepSpeed engine is built, only
when a run starts (a resumed run takes everything from its checkpoint). Accepted paths:

- an encoder export or a run directory (``encoder.safetensors`` + ``encoder.json``), such as
  ``tools/pretrain.py``, ``tools/finetune.py`` and ``tools/convert.py`` write, or one of the two files;
- any other checkpoint file with timm-keyed encoder weights (``.safetensors`` or a torch file,
  optionally under ``model``), such as the official ``mae_pretrain_vit_base.pth``; a whole
  method's ``model.safetensors`` is read through its ``encoder.`` keys.

Every tensor of the file whose name the encoder has is loaded; names only the encoder has are
reported as missing (they keep their initialisation), names only the file has (a decoder, a
head) as ignored. A tensor of another shape is an error naming each key and both shapes, with
one exception: a position table for another patch grid is resampled (a sin-cos table is
regenerated exactly, a learned one interpolated bicubically, as MAE's ``interpolate_pos_embed``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.interop.loading import read_state_dict
from mimkit.interop.timm import grid_of, resample_table
from mimkit.models.backbone import ENCODER_WEIGHTS

EXPORT_FORMAT = "mimkit-encoder-v1"  # the "format" of encoder.json (mimkit.models.save_backbone)
LISTED = 8  # key names shown in a message before "... and N more"


class InitShapeError(ValueError):
    """Tensors of ``train.init_from`` whose shapes differ from the encoder's; the message lists them."""


@dataclass
class InitReport:
    """What :func:`load_init` did."""

    path: Path
    loaded: list[str]
    missing: list[str]  # encoder tensors the file lacks: left at their initialisation
    ignored: list[str]  # file tensors the encoder lacks
    resized: list[str] = field(default_factory=list)
    normalization: dict[str, list[float]] | None = None  # what the export records, if any

    def describe(self) -> str:
        total = len(self.loaded) + len(self.missing)
        lines = [
            f"[mimkit] train.init_from {self.path}: loaded {len(self.loaded)} of the encoder's {total} "
            "tensors into method.encoder",
            f"[mimkit]   missing from the file (kept at their initialisation): {_names(self.missing)}",
            f"[mimkit]   in the file but not the encoder (ignored): {_names(self.ignored)}",
        ]
        if self.resized:
            lines.append(f"[mimkit]   resampled to the encoder's patch grid: {_names(self.resized)}")
        return "\n".join(lines)


def _names(keys: list[str]) -> str:
    if not keys:
        return "none"
    more = f" ... and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def resolve_init_path(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """The weights file ``path`` names and the export config beside it (None for a bare checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights = path / ENCODER_WEIGHTS
        if not weights.is_file():
            what = "run directory" if (path / "checkpoints").is_dir() else "directory"
            raise FileNotFoundError(
                f"train.init_from: {what} {path} holds no {ENCODER_WEIGHTS} (a run writes it when it "
                "finishes; convert official checkpoints with tools/convert.py)"
            )
    elif path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
        weights = path.with_suffix(".safetensors")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    config_path = weights.with_suffix(".json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        config = None  # not an encoder export's config (e.g. timm.json beside timm.safetensors)
    return weights, config


def _encoder_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """The file's state with a whole method's ``encoder.`` prefix removed when that is what matches."""
    prefix = "encoder."
    if not state.keys() & expected and any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _fit_pos_embed(
    given: torch.Tensor, own: torch.Tensor, encoder: nn.Module, config: dict | None
) -> torch.Tensor | None:
    """``given`` resampled to ``own``'s grid when only the number of patches differs, else None."""
    if given.ndim != 3 or given.shape[0] != 1 or given.shape[2] != own.shape[2]:
        return None
    prefix = encoder.num_prefix_tokens
    try:
        source_size = config.get("img_size") if config else None
        old = grid_of(given, prefix, source_size, encoder.patch_size)
    except ValueError:
        return None
    if old[0] * old[1] + prefix != given.shape[1]:
        return None
    return resample_table(given, old, tuple(encoder.grid_size), prefix)


def load_init(encoder: nn.Module, path: str | os.PathLike) -> InitReport:
    """Load the encoder weights at ``path`` into ``encoder`` (see the module docstring).

    Raises :class:`InitShapeError` listing every tensor whose shape differs (file vs encoder), and a
    ValueError when no tensor of the file matches the encoder at all.
    """
    weights, config = resolve_init_path(path)
    own = encoder.state_dict()
    state = _encoder_keys(read_state_dict(weights), set(own))
    shared = [k for k in own if k in state]
    if not shared:
        example = next(iter(own))
        raise ValueError(
            f"train.init_from {weights}: none of its {len(state)} tensors is named as method.encoder's "
            f"(e.g. {example!r}); official MAE/CAE and mmpretrain checkpoints are converted with "
            "tools/convert.py first"
        )
    resized, wrong = [], []
    for key in shared:
        if state[key].shape == own[key].shape:
            continue
        fitted = _fit_pos_embed(state[key], own[key], encoder, config) if key == "pos_embed" else None
        if fitted is None:
            wrong.append(f"{key}: file {tuple(state[key].shape)} vs encoder {tuple(own[key].shape)}")
        else:
            resized.append(f"{key} {tuple(state[key].shape)} -> {tuple(fitted.shape)}")
            state[key] = fitted
    if wrong:
        arch = ""
        if config:
            shape = {k: config.get(k) for k in ("name", "embed_dim", "depth", "num_heads", "patch_size")}
            arch = f"; its encoder.json says {shape}"
        raise InitShapeError(
            f"train.init_from {weights}: {len(wrong)} tensor(s) do not fit method.encoder "
            f"({getattr(encoder, 'name', type(encoder).__name__)}): "
            + "; ".join(wrong[:LISTED])
            + (f"; ... and {len(wrong) - LISTED} more" if len(wrong) > LISTED else "")
            + f"{arch}. Set method.backbone to the file's architecture"
        )
    with torch.no_grad():
        for key in shared:
            own[key].copy_(state[key])
    return InitReport(
        path=weights,
        loaded=shared,
        missing=[k for k in own if k not in state],
        ignored=[k for k in state if k not in own],
        resized=resized,
        normalization=(config or {}).get("normalization"),
    )
