"""Fixed 2D sine-cosine position embeddings in the official MAE channel layout.

MAE (facebookresearch/mae, util/pos_embed.py) fills the first half of the channels with the
*column* coordinate and the second half with the *row* coordinate:
``[sin(col*w), cos(col*w), sin(row*w), cos(row*w)]`` with ``w_k = 1 / 10000^(k / (D/4))``.
CAE, mmpretrain and ColorMAE put the row first. mimkit follows MAE so that official MAE
checkpoints (which store their table) match a regenerated one; converters from the other
layout must swap the two halves.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) table ``[sin(p*w), cos(p*w)]``, ``w_k = 10000^(-k/(dim/2))``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(cls + rows*cols, dim) float32 table for a row-major patch grid; the cls row is zeros.

    Channel layout is MAE's: column coordinate first, row coordinate second.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = grid_size
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, col_idx.flatten()), sincos_1d(dim // 2, row_idx.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()
