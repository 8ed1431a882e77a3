"""Pixel targets and the masked reconstruction loss shared by the MAE family."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), row-major patches, each laid out (pixel row, pixel col, channel).

    This is the official MAE layout (``nchpwq -> nhwpqc``), so predictions of an official
    decoder line up with these targets.
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, rows*p, cols*p)."""
    b, length, dim = patches.shape
    rows, cols = grid_size
    p = patch_size
    c = dim // (p * p)
    if rows * cols != length or p * p * c != dim:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid {grid_size} and patch {p}")
    x = patches.reshape(b, rows, cols, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, rows * p, cols * p)


def pixel_targets(
    images: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
):
    """MAE's reconstruction target: patchified (normalised) pixels, (B, L, p*p*C).

    With ``norm_pix`` each patch is standardised by its own mean and unbiased variance
    (``(x - mean) / sqrt(var + 1e-6)``), MAE's norm_pix_loss. With ``mask`` only the selected
    patches are returned, (B, M, p*p*C) (see :func:`select_patches`); normalisation is per patch,
    so this equals selecting afterwards.
    """
    target = patchify(images, patch_size)
    if mask is not None:
        target = select_patches(target, mask)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE averaged over masked patches only.

    Args:
        pred, target: (B, L, D).
        mask: (B, L) bool or 0/1, True = masked; visible patches contribute nothing.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def select_patches(patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The patches where ``mask`` is True, (B, L, D) -> (B, M, D), keeping row-major order.

    Every row of ``mask`` must hold the same count M, as every mask generator guarantees.
    """
    b, _, dim = patches.shape
    return patches[mask].view(b, -1, dim)


def selected_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE averaged over patches, both (B, M, D): :func:`masked_mse` on selected patches."""
    return (pred.float() - target.float()).pow(2).mean()


def scatter_patches(selected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, M, D) values back at the True positions of ``mask`` in a zero (B, L, D) tensor."""
    full = selected.new_zeros(*mask.shape, selected.shape[-1])
    full[mask] = selected.reshape(-1, selected.shape[-1])
    return full
