"""A bare MAE training step, computed the way the original MAE code computes it.

This is the yardstick :mod:`benchmarks.step` times mimkit's trainer path against: no registry,
no recipe, no DeepSpeed, just timm's ``PatchEmbed`` and ``Block``, masking by sorting uniform
noise and gathering (``argsort``; the mask is ``gather``-ed back with the inverse permutation),
a decoder that runs over all tokens and a head over all patches, the loss computed on the full
(B, L) grid and weighted by the mask, and a plain ``torch.optim.AdamW`` (no decay on 1-D
parameters, as MAE's ``add_weight_decay``). ``fused_attn`` picks timm's attention path: ``True``
is ``scaled_dot_product_attention``, as current timm blocks run by default; ``False`` (the
default here) is the explicit softmax(q k^T) v of the timm 0.3 blocks the original code ran on.

:meth:`ReferenceMAE.from_mae` copies the weights of a mimkit :class:`~mimkit.ssl.mae.MAE`, so
both compute the same loss and gradients on the same images and mask (checked in the tests).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.models.pos_embed import sincos_2d
from mimkit.ssl.mae import MAE

# mimkit MAE key prefix -> reference key prefix (the official ``models_mae.py`` names)
KEY_MAP = (
    ("encoder.", ""),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.mask_token", "mask_token"),
    ("decoder.pos_embed", "decoder_pos_embed"),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "decoder_pred."),
)


def reference_name(mimkit_name: str) -> str:
    """The reference parameter name for a mimkit MAE parameter name."""
    for ours, theirs in KEY_MAP[1:] + KEY_MAP[:1]:  # the bare "encoder." prefix last
        if mimkit_name.startswith(ours):
            return theirs + mimkit_name[len(ours) :]
    raise KeyError(f"{mimkit_name!r} has no counterpart in the reference MAE")


class ReferenceMAE(nn.Module):
    """MAE as the original code builds it (ViT encoder with cls token, 1-D sin-cos positions kept fixed)."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        decoder_mlp_ratio: float,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        fused_attn: bool = False,
    ):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, cls_token=True)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_dim, grid, cls_token=True)[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        for block in [*self.blocks, *self.decoder_blocks]:
            block.attn.fused_attn = fused_attn

    @classmethod
    def from_mae(cls, mae: MAE, fused_attn: bool = False) -> ReferenceMAE:
        """The reference with ``mae``'s shapes and a copy of its weights."""
        enc, dec = mae.encoder, mae.decoder
        ref = cls(
            img_size=enc.patch_embed.img_size[0],
            patch_size=enc.patch_size,
            in_chans=enc.in_chans,
            embed_dim=enc.embed_dim,
            depth=len(enc.blocks),
            num_heads=enc.blocks[0].attn.num_heads,
            mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim,
            decoder_dim=dec.embed.out_features,
            decoder_depth=len(dec.blocks),
            decoder_heads=dec.blocks[0].attn.num_heads,
            decoder_mlp_ratio=dec.blocks[0].mlp.fc1.out_features / dec.embed.out_features,
            mask_ratio=mae.mask_generator.ratio,
            norm_pix_loss=mae.norm_pix_loss,
            fused_attn=fused_attn,
        ).to(next(mae.parameters()).device)
        state = {reference_name(k): v for k, v in mae.state_dict().items()}
        ref.load_state_dict(state, strict=True)
        return ref

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Keep the lowest-noise patches: (kept tokens, mask (B, L) 1 = masked, restoring permutation)."""
        b, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, dim))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None):
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        b, tokens, dim = x.shape
        masked = self.mask_token.repeat(b, ids_restore.shape[1] + 1 - tokens, 1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].repeat(1, 1, dim))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        b, c, h, w = images.shape
        target = images.reshape(b, c, h // p, p, w // p, p)
        target = torch.einsum("nchpwq->nhwpqc", target).reshape(b, (h // p) * (w // p), p * p * c)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """(loss, pred (B, L, p*p*C), mask (B, L) float 1 = masked)."""
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask


def reference_optimizer(
    model: nn.Module, lr: float = 1.5e-4, weight_decay: float = 0.05
) -> torch.optim.AdamW:
    """Plain ``torch.optim.AdamW`` (betas 0.9, 0.95) with MAE's decay groups (1-D params and biases skip)."""
    decay, skip = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (skip if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": skip, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def noise_for_mask(mask: torch.Tensor) -> torch.Tensor:
    """Uniform-looking noise whose argsort keeps exactly the visible patches of ``mask`` (True = masked)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(mask.shape, generator=g).to(mask.device) * 0.5
    return noise + 0.5 * mask.float()
