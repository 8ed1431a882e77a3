"""How frozen forward passes run: one settings object shared by every evaluation entry point.

:class:`ExtractSettings` holds what every protocol needs to turn images into features and
nothing about the protocol itself: input size, the blocks whose cls tokens are kept, autocast
precision, images per forward pass, device, loader processes, feature cache and progress bars.
Protocols take it as ``extract=`` (``knn_eval(encoder, train, val, ks=(20,),
extract=ExtractSettings(batch_size=64))``); the tools build it from their shared arguments with
:meth:`ExtractSettings.from_args`. A protocol that reads a fixed number of blocks (the linear
probe's grid, k-NN's last block) sets ``n_last_blocks`` itself.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Autocast dtypes of the frozen forward pass (MAE's probe and DINOv2's evaluations run under
# autocast); features are returned in float32 whatever the precision.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ExtractSettings:
    """Feature-extraction settings; a bad value is a ValueError naming it and the valid ones.

    Attributes:
        img_size: input resolution; None means the encoder's own. An encoder evaluated at another
            size is loaded at it (``load_encoder(..., img_size=)``).
        n_last_blocks: blocks whose final-normed cls tokens ``last_cls`` holds (oldest first).
        precision: autocast dtype of the forward passes, a key of :data:`PRECISIONS`.
        batch_size: images per forward pass.
        device: where the encoder runs (and the protocol computes: k-NN search, heads).
        workers: DataLoader processes (0: load in the calling process).
        cache_dir: where :func:`~mimkit.eval.features.source_features` keeps features (None: no cache).
        progress: show progress bars.
    """

    img_size: int | None = None
    n_last_blocks: int = 1
    precision: str = "fp32"
    batch_size: int = 256
    device: str | torch.device = "cpu"
    workers: int = 0
    cache_dir: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                none = " (or None for the encoder's own)" if allow_none else ""
                raise ValueError(f"{name}={value!r} must be a positive integer{none}")

        positive("img_size", self.img_size, allow_none=True)
        positive("n_last_blocks", self.n_last_blocks)
        positive("batch_size", self.batch_size)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(
                f"workers={self.workers!r} must be a non-negative integer (0: no worker processes)"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"unknown device {self.device!r}; valid: e.g. cpu, cuda, cuda:1 ({err})"
            ) from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ExtractSettings:
        """The settings the shared tool arguments name (:func:`~mimkit.eval.common.add_eval_args`).

        ``--batch-size`` left unset (a tool whose default is None) keeps the default of 256;
        ``overrides`` replace fields (``n_last_blocks=4``).
        """
        values = {
            "img_size": args.img_size,
            "precision": args.precision,
            "device": args.device,
            "workers": args.workers,
            "cache_dir": args.cache_dir,
            "progress": not args.no_progress,
        }
        if args.batch_size is not None:
            values["batch_size"] = args.batch_size
        return cls(**{**values, **overrides})

    def image_size(self, encoder: torch.nn.Module) -> int:
        """``img_size``, or the encoder's input size where it is None."""
        return self.img_size or encoder.patch_embed.img_size[0]

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, for result files (``progress`` left out: it changes nothing)."""
        out = asdict(self)
        out.pop("progress")
        out["device"] = str(self.device)
        out["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return out
