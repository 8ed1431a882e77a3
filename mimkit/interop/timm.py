"""timm ViT state dicts -> mimkit encoders: architecture from tensor shapes, strict loading, resampling.

A mimkit :class:`~mimkit.models.Backbone` has exactly the keys of timm's ``VisionTransformer``
with ``num_classes=0``, so a timm state dict needs no renaming: only its classifier is dropped
and the architecture is read off the tensors. Heads cannot be read from shapes; they come from
the registry preset of the same width (:data:`HEADS_BY_WIDTH`) unless the caller says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from mimkit.models import Backbone, create_backbone, sincos_2d

# Registry presets by width: the backbone name recorded in the export and the head count.
NAME_BY_WIDTH = {
    192: "vit_tiny_patch16",
    384: "vit_small_patch16",
    768: "vit_base_patch16",
    1024: "vit_large_patch16",
    1280: "vit_huge_patch14",
}
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Layer scale is loaded from the checkpoint; this only switches timm's LayerScale modules on.
LAYER_SCALE_INIT = 0.1
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_SINCOS_ATOL = 1e-4


@dataclass
class Converted:
    """What a converter produced.

    Attributes:
        encoder: the mimkit encoder, loaded strictly.
        model: the full method when its decoder was kept, else None.
        method_cfg: the ``build_method`` mapping that rebuilds ``model`` (None without it).
        dropped: checkpoint keys left out, with nothing in mimkit to hold them.
        notes: what the converter did that a user should know.
        extra: facts recorded in ``encoder.json`` beside the architecture.
    """

    encoder: Backbone
    model: nn.Module | None = None
    method_cfg: dict[str, Any] | None = None
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> None:
    """Raise a ValueError naming the missing, unexpected and wrongly shaped keys, if any."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if given[k].shape != expected[k].shape
    )
    if not (missing or unexpected or shapes):
        return

    def listed(title: str, items: list[str]) -> str:
        more = f" (+{len(items) - 25} more)" if len(items) > 25 else ""
        return f"\n  {title} ({len(items)}): {', '.join(items[:25])}{more}" if items else ""

    raise ValueError(
        f"the checkpoint does not fit {what}:"
        + listed("missing keys", missing)
        + listed("unexpected keys", unexpected)
        + listed("shape mismatches", shapes)
    )


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the bad keys."""
    check_keys(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


def clean_timm_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the classifier (``head.*``) and map a fine-tuned ``fc_norm`` to ``norm``.

    Returns the encoder state and the dropped keys. timm (and MAE fine-tuning with global
    average pooling) replaces the final ``norm`` by ``fc_norm``; mimkit's encoder keeps ``norm``,
    so its parameters go there.
    """
    out, dropped = {}, []
    has_norm = "norm.weight" in state
    for key, value in state.items():
        if key.startswith("head.") or key.startswith("head_dist."):
            dropped.append(key)
        elif key.startswith("fc_norm.") and not has_norm:
            out["norm." + key[len("fc_norm.") :]] = value
        elif key.startswith("fc_norm."):
            dropped.append(key)
        else:
            out[key] = value
    return out, dropped


def grid_of(pos_embed: torch.Tensor, num_prefix: int, img_size: Any, patch_size: int) -> tuple[int, int]:
    """Patch grid of a stored table: from ``img_size`` when given, else the table must be square."""
    n = pos_embed.shape[1] - num_prefix
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        return h // patch_size, w // patch_size
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(
            f"position table of {n} patches is not a square grid; pass img_size to say its shape"
        )
    return side, side


def is_sincos(table: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> bool:
    """Whether ``table`` (1, prefix + L, D) is mimkit's (MAE's) fixed sin-cos table for ``grid``."""
    dim = table.shape[-1]
    if dim % 4 or table.shape[1] != num_prefix + grid[0] * grid[1]:
        return False
    ref = sincos_2d(dim, grid, cls_token=num_prefix == 1)[None]
    return torch.allclose(table.float(), ref, atol=_SINCOS_ATOL)


def resample_table(
    table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """A position table for ``new_grid``.

    A fixed sin-cos table is regenerated exactly (so resampling there and back is lossless);
    anything else is interpolated with timm's ``resample_abs_pos_embed`` (bicubic).
    """
    if tuple(old_grid) == tuple(new_grid):
        return table.clone()
    if is_sincos(table, old_grid, num_prefix):
        return sincos_2d(table.shape[-1], new_grid, cls_token=num_prefix == 1)[None].to(table.dtype)
    return resample_abs_pos_embed(
        table, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix, verbose=False
    ).to(table.dtype)


def infer_arch(
    state: dict[str, torch.Tensor], num_heads: int | None = None, img_size: Any = None
) -> dict[str, Any]:
    """``create_backbone`` arguments (``name`` included) read from a timm-keyed encoder state dict.

    Depth, width, patch size, channels, MLP ratio, qkv bias and layer scale come from the
    tensors; the image size from the position table (square grids; else pass ``img_size``);
    heads from ``num_heads`` or the preset of the same width.
    """
    needed = ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(
            f"not a ViT encoder state dict in timm's layout: missing {', '.join(absent)} "
            f"(first keys: {', '.join(list(state)[:8])})"
        )
    proj = state["patch_embed.proj.weight"]
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    if num_heads is None:
        if width not in HEADS_BY_WIDTH:
            raise ValueError(
                f"cannot tell the heads of a {width}-wide ViT from its tensors; pass num_heads "
                f"(presets: {', '.join(f'{w}->{h}' for w, h in HEADS_BY_WIDTH.items())})"
            )
        num_heads = HEADS_BY_WIDTH[width]
    if width % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide the width {width}")
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    grid = grid_of(state["pos_embed"], 1, img_size, patch)
    arch = {
        "name": NAME_BY_WIDTH.get(width, "vit_base_patch16"),
        # an int for square images, as recipes want; [H, W] otherwise
        "img_size": grid[0] * patch if grid[0] == grid[1] else [grid[0] * patch, grid[1] * patch],
        "patch_size": patch,
        "in_chans": in_chans,
        "pos_embed": "sincos" if is_sincos(state["pos_embed"], grid) else "learn",
        "embed_dim": width,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }
    if "blocks.0.ls1.gamma" in state:
        arch["init_values"] = LAYER_SCALE_INIT
    return arch


def resample_encoder_state(
    state: dict[str, torch.Tensor], img_size: int | tuple[int, int], source_img_size: Any = None
) -> dict[str, torch.Tensor]:
    """A copy of a timm-keyed encoder state whose ``pos_embed`` fits ``img_size`` (input untouched).

    ``source_img_size`` is needed only when the stored table is not a square grid.
    """
    patch = state["patch_embed.proj.weight"].shape[-1]
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % patch or w % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    old_grid = grid_of(state["pos_embed"], 1, source_img_size, patch)
    return {**state, "pos_embed": resample_table(state["pos_embed"], old_grid, (h // patch, w // patch))}


def encoder_from_state(
    state: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    source_img_size: Any = None,
) -> Backbone:
    """Build a mimkit Backbone from a timm-keyed encoder state dict and load it strictly.

    Args:
        num_heads: override the preset head count of the width.
        img_size: resample the position table to this image size first.
        source_img_size: the checkpoint's image size, needed only for a non-square table.
    """
    if img_size is not None:
        infer_arch(state, num_heads=num_heads, img_size=source_img_size)  # fails clearly on a bad state
        state = resample_encoder_state(state, img_size, source_img_size)
        source_img_size = img_size
    arch = infer_arch(state, num_heads=num_heads, img_size=source_img_size)
    backbone = create_backbone(**arch)
    load_strict(
        backbone, state, f"a mimkit {arch['name']} encoder ({arch['depth']} blocks, {arch['embed_dim']} wide)"
    )
    return backbone


def timm_to_mimkit(
    state: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    source_img_size: Any = None,
) -> Converted:
    """Convert a timm ViT state dict (any registry shape); the classifier is dropped."""
    enc, dropped = clean_timm_state(state)
    notes = [f"dropped the classifier keys {', '.join(dropped)}"] if dropped else []
    encoder = encoder_from_state(enc, num_heads=num_heads, img_size=img_size, source_img_size=source_img_size)
    return Converted(encoder=encoder, dropped=dropped, notes=notes)
