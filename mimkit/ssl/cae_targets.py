"""Reconstruction targets for a decoder that predicts the masked patches: what it predicts, and the loss.

CAE (Chen et al., IJCV 2023) reconstructs DALL-E token ids of the masked patches. mimkit never
fetches weights at run time, so it defaults to MAE's normalised pixels (the target the Paddle
CAE code offers as ``target_mode='rgb'``) and keeps the token target pluggable: a tokenizer
held locally plugs in by name.

A target is built from a recipe entry, the way a mask generator is::

    build_target({"type": "pixels", "norm_pix": True}, patch_size=16, in_chans=3)
    build_target({"type": "tokens", "tokenizer": "my_pkg.dalle:load_encoder", "vocab_size": 8192}, ...)

and has three parts: ``out_dim`` (values the decoder head predicts per patch), ``forward(images)``
(the per-patch targets of every patch, (B, L, ...), computed without gradient) and
``loss(pred, target)`` (pred (B, M, out_dim) and target (B, M, ...) of the masked patches only;
returns ``{"loss_rec": scalar, ...}``, extra scalars are logged). A new kind subclasses
:class:`ReconstructionTarget` and registers with :func:`register_target`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.registry import Registry
from mimkit.ssl.targets import pixel_targets


class ReconstructionTarget(nn.Module):
    """Base class. Subclasses take ``patch_size`` and ``in_chans`` keywords plus their own options."""

    out_dim: int

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) targets of every patch (row-major) of ``images`` (B, C, H, W)."""
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss_rec": scalar, ...}`` from (B, M, out_dim) predictions and (B, M, ...) targets."""
        raise NotImplementedError


TARGETS: Registry[ReconstructionTarget] = Registry(
    "target type", key="type", injected=("patch_size", "in_chans")
)


def register_target(name: str) -> Callable[[type[ReconstructionTarget]], type[ReconstructionTarget]]:
    """Class decorator registering a reconstruction target under ``name``."""
    return TARGETS.register(name)


def list_targets() -> list[str]:
    """Registered target types."""
    return TARGETS.names()


def build_target(cfg: str | dict[str, Any], patch_size: int, in_chans: int) -> ReconstructionTarget:
    """Build a target from a type name or a mapping such as ``{"type": "pixels", "norm_pix": True}``."""
    cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg)
    return TARGETS.build(cfg, "target.", patch_size=patch_size, in_chans=in_chans)


@register_target("pixels")
class PixelTarget(ReconstructionTarget):
    """Patchified pixels, each patch standardised by its own mean and variance (MAE's norm-pix).

    The loss is the mean squared error over the masked patches (mean over all their elements),
    as Paddle CAE's RGB target and MAE compute it.
    """

    def __init__(self, patch_size: int, in_chans: int, norm_pix: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.out_dim = patch_size**2 * in_chans

    @torch.no_grad()
    def forward(self, images):
        return pixel_targets(images.float(), self.patch_size, self.norm_pix)

    def loss(self, pred, target):
        return {"loss_rec": F.mse_loss(pred.float(), target.float())}

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}"


def resolve_tokenizer(spec: str | nn.Module, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A tokenizer module given as itself or as ``"package.module:name"``.

    ``name`` is either a module instance or a factory called with ``kwargs`` (for instance a
    function that loads locally held DALL-E encoder weights and returns the encoder).
    """
    if isinstance(spec, nn.Module):
        if kwargs:
            raise ValueError("tokenizer_kwargs only apply to a tokenizer given as 'package.module:factory'")
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"tokenizer must be a module or 'package.module:factory', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import tokenizer {spec!r}: {err}") from None
    if not isinstance(obj, nn.Module):
        obj = obj(**(kwargs or {}))
    if not isinstance(obj, nn.Module):
        raise ValueError(f"tokenizer {spec!r} gave a {type(obj).__name__}, not a torch module")
    return obj


@register_target("tokens")
class TokenTarget(ReconstructionTarget):
    """Discrete token ids from a frozen tokenizer, predicted with cross-entropy (CAE's DALL-E target).

    The tokenizer receives the images exactly as the method does (normalised, (B, C, H, W)) and
    returns either integer ids, (B, rows, cols) or (B, L), one per patch of the encoder's grid,
    or logits (B, vocab_size, rows, cols), whose argmax over the vocabulary are the ids (the
    DALL-E encoder's output). Anything the official pipeline does before the tokenizer (a
    112-px Lanczos copy of the crop, DALL-E's ``0.8 x + 0.1`` input map) belongs in the module.

    The tokenizer is frozen, run in eval mode under ``no_grad`` and kept out of the module tree:
    its weights are not trained, not in checkpoints and not cast by mixed precision. It follows
    the images to their device on first use; its input is cast to its own parameter dtype.
    The loss is cross-entropy averaged over masked patches; ``mlm_acc`` is the token accuracy.
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        tokenizer: str | nn.Module | None = None,
        vocab_size: int = 8192,
        tokenizer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if tokenizer is None:
            raise ValueError(
                "target 'tokens' needs a tokenizer: a torch module or 'package.module:factory' "
                "producing token ids per patch"
            )
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        tok = resolve_tokenizer(tokenizer, tokenizer_kwargs).eval().requires_grad_(False)
        self._tokenizer = (tok,)  # a tuple hides it from the module tree (state_dict, .to(), DeepSpeed)
        self.out_dim = vocab_size

    @property
    def tokenizer(self) -> nn.Module:
        return self._tokenizer[0]

    @torch.no_grad()
    def forward(self, images):
        tok = self.tokenizer
        param = next(tok.parameters(), None)
        if param is not None:
            if param.device != images.device:
                tok.to(images.device)
            images = images.to(param.dtype)
        out = tok(images)
        if out.is_floating_point():
            if out.ndim != 4 or out.shape[1] != self.out_dim:
                raise ValueError(
                    f"tokenizer logits must be (B, vocab_size={self.out_dim}, rows, cols), "
                    f"got {tuple(out.shape)}"
                )
            out = out.argmax(1)
        return out.reshape(images.shape[0], -1).long()  # the method checks the count against its grid

    def loss(self, pred, target):
        logits = pred.float().flatten(0, 1)
        labels = target.flatten()
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss_rec": F.cross_entropy(logits, labels), "mlm_acc": acc.detach()}

    def extra_repr(self) -> str:
        return f"vocab_size={self.out_dim}, tokenizer={type(self.tokenizer).__name__}"
