"""MAE's lightweight decoder, reused by every method with a pixel-reconstruction branch."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.models.pos_embed import sincos_2d
from mimkit.ssl.targets import masked_mse, pixel_targets, scatter_patches, select_patches, selected_mse


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
        self.grad_checkpointing = False  # MaskedImageModel.set_grad_checkpointing sets it

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
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x

    def head(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch predictions from :meth:`forward_features` (cls dropped).

        With ``mask`` (B, L) bool, True = predicted, holding the same count M in every row, only
        those patches go through the final norm and projection: (B, M, out_dim) in row-major
        order. Both act per token, so this equals selecting from the full (B, L, out_dim)
        output; it spares the work (and the memory) for patches the loss never reads.
        """
        if mask is None:
            return self.pred(self.norm(features[:, 1:]))
        return self.pred(self.norm(select_patches(features[:, 1:], mask)))

    def pixel_loss(
        self,
        features: torch.Tensor,
        images: torch.Tensor,
        mask: torch.Tensor,
        patch_size: int,
        norm_pix: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE's loss on the masked patches and the predictions, from :meth:`forward_features`.

        Returns ``(loss, pred)``, pred (B, L, out_dim). In training mode the head and the targets
        cover the masked patches only, the ones the loss reads (same loss and gradients, less
        work), and ``pred`` is a detached copy with zeros at visible positions; in eval mode
        every patch is predicted, for pictures.
        """
        if not self.training:
            pred = self.head(features)
            return masked_mse(pred, pixel_targets(images, patch_size, norm_pix), mask), pred
        pred = self.head(features, mask)
        loss = selected_mse(pred, pixel_targets(images, patch_size, norm_pix, mask=mask))
        return loss, scatter_patches(pred.detach(), mask)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, L, out_dim) predictions for every patch."""
        return self.head(self.forward_features(latent, ids_keep))
