"""AdamW with MAE's parameter groups, optionally with layer-wise lr decay (fine-tuning).

Every group may carry an ``lr_scale``; the trainer sets each group's lr to the schedule's value
times that scale (1 where a group has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch ships a fused AdamW kernel


def no_weight_decay(name: str, param: nn.Parameter, suffixes: Sequence[str]) -> bool:
    """Biases and norm weights (every 1-D parameter) and names ending in ``suffixes`` skip decay."""
    return param.ndim <= 1 or name.endswith(tuple(suffixes))


def param_groups(model: nn.Module, weight_decay: float, no_decay: Sequence[str]) -> list[dict]:
    """Two AdamW groups, decayed and not; frozen parameters are left out, empty groups dropped.

    MAE's ``add_weight_decay`` exempts 1-D parameters; ``no_decay`` (default ``pos_embed``,
    ``_token``) also exempts position embeddings and the cls/mask tokens, as mmpretrain does.
    """
    decay, skip = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (skip if no_weight_decay(name, param, no_decay) else decay).append(param)
    groups = [{"params": skip, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def layer_decay_groups(
    model: nn.Module, weight_decay: float, no_decay: Sequence[str], layer_decay: float
) -> list[dict]:
    """AdamW groups with layer-wise lr decay: timm's ``param_groups_layer_decay`` on ``model``.

    ``model.group_matcher()`` numbers the layers (timm's convention); with ``L`` the top layer,
    layer ``l`` gets ``lr_scale = layer_decay ** (L - l)``. The weight-decay rule is
    :func:`no_weight_decay`'s, passed to timm as the exact names it exempts.
    """
    from timm.optim import param_groups_layer_decay

    exempt = [n for n, p in model.named_parameters() if no_weight_decay(n, p, no_decay)]
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=exempt, layer_decay=layer_decay
    )


def build_adamw(
    model: nn.Module,
    lr: float,
    betas: Sequence[float],
    eps: float,
    weight_decay: float,
    no_decay: Sequence[str],
    device: torch.device,
    layer_decay: float | None = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups` (or :func:`layer_decay_groups`), fused on CPU and CUDA.

    The fused kernel updates a ViT-S MAE's 47.6 M parameters in 18 ms on 2 CPU cores, against
    148 ms for the default per-parameter loop and 131 ms for ``foreach`` (benchmarks/micro.py).
    The learning rate is overwritten every step by the schedule; ``lr`` is only its start value.
    """
    if layer_decay is None:
        groups = param_groups(model, weight_decay, no_decay)
    else:
        groups = layer_decay_groups(model, weight_decay, no_decay, layer_decay)
    fused = device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
