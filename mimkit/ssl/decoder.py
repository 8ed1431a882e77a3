"""MAE's lightweight decoder, reused by every method with a pixel-reconstruction branch."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.models.pos_embed import sincos_2d


class MAEDecoder(nn.Module):
    """Decoder of He et al. 2022: visible latents plus a shared mask token, fixed sin-cos positions.

    Official-key correspondence (``models_mae.py``): ``decoder_embed`` -> ``embed``,
    ``mask_token`` -> ``mask_token``, ``decoder_pos_embed`` -> ``pos_embed``,
    ``decoder_blocks`` -> ``blocks``, ``decoder_norm`` -> ``norm``, ``decoder_pred`` -> ``pred``.

    Args:
        encoder_dim: width of the latents coming in.
        grid_size: patch grid (rows, cols).
        out_dim: values predicted per patch (p*p*C for pixels).
        dim, depth, num_heads, mlp_ratio: the paper's default is 512 wide, 8 deep, 16 heads.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by its {num_heads} heads")
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.grid_size = tuple(grid_size)
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, self.grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward_features(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Last-block tokens before the final norm, (B, 1 + L, dim), cls first, row-major patches.

        Args:
            latent: (B, 1 + K, encoder_dim), cls then the visible tokens in ``ids_keep`` order.
            ids_keep: (B, K) patch indices of the visible tokens.
        """
        x = self.embed(latent)
        b, _, dim = x.shape
        full = self.mask_token.expand(b, self.num_patches, dim)
        full = torch.scatter(full, 1, ids_keep[..., None].expand(-1, -1, dim), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Per-patch predictions (B, L, out_dim) from :meth:`forward_features` (cls dropped)."""
        return self.pred(self.norm(features))[:, 1:]

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, L, out_dim) predictions for every patch."""
        return self.head(self.forward_features(latent, ids_keep))
