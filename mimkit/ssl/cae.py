"""CAE: Chen et al., "Context Autoencoder for Self-Supervised Representation Learning" (IJCV 2023).

CAE separates representation learning from the pretext task (official code Atten4Vis/CAE,
``models/modeling_cae.py`` and ``models/modeling_cae_helper.py``):

1. **Encoder** F: the registry ViT on the visible patches plus cls; cls is dropped afterwards.
   Its outputs Z_v are the visible latents.
2. **Latent contextual regressor** H: ``regressor_depth`` cross-attention blocks. The queries
   start as one shared learned mask token at every masked position; per block, with P the fixed
   sin-cos positions of the regressor/decoder width,
   ``x_m += ls1 * CrossAttn(LN_q(x_m + P_m), LN_k([Z_v; x_m] + [P_v; P_m]), LN_v([Z_v; x_m]))``,
   then ``x_m = LN_2(x_m)`` and ``x_m += ls2 * MLP(x_m)``. Z_v is never updated. A final
   LayerNorm gives the predicted masked latents.
3. **Alignment**: the same encoder, weights shared (not an EMA), run under ``no_grad`` on the
   *masked* patches gives the targets Z_m; ``loss_align = MSE(predicted, Z_m)``.
4. **Decoder** G: ``decoder_depth`` self-attention blocks over the predicted masked latents plus
   P_m only (it never sees a visible token), LayerNorm, a linear head per masked patch.

``loss = loss_rec + align_loss_weight * loss_align`` (weight 2 in every official script).

Where mimkit departs from the official code, and why:

- **Attention biases.** Official encoder and decoder blocks are BEiT's: qkv without bias plus
  learnable q and v biases (the key bias is fixed at zero). mimkit's encoder is the shared timm
  ViT and the decoder uses timm ``Block``, whose fused qkv bias also has a learnable key part.
  The function class is the same: a key bias adds ``q . b_k`` to every logit of a query, which
  the softmax cancels, so it never changes an output and its gradient is zero. A converter maps
  ``q_bias, v_bias`` to ``qkv.bias = [q_bias, 0, v_bias]``. The regressor's cross-attention is
  mimkit's own and matches the official one (bias on q and v, none on k).
- **Layer scale and drop path of the encoder** come from the backbone overrides
  ``init_values`` (timm's ``ls1/ls2.gamma``, official ``gamma_1/gamma_2``; 0.1 for Base) and
  ``drop_path_rate``, set in the recipe.
- **Position embeddings** use mimkit's sin-cos table, MAE's channel layout (column first); the
  official tables put the row first. Either layout is a fixed, invertible relabelling of
  channels, so training from scratch is unaffected; only converted official checkpoints must
  swap the halves (the exported encoder stores its own table). The official regressor table
  ``rd_pos_embed`` has an unused zero cls row; mimkit's ``pos_embed`` holds the patch rows only.
- **Alignment encoder.** The official model keeps a second encoder whose parameters' ``.data``
  point at the encoder's after every step; mimkit calls the encoder itself under ``no_grad``.
  The numbers are the same, drop path included (the official target pass also runs in train
  mode), and checkpoints hold no duplicate encoder.
- **Target.** Official CAE reconstructs DALL-E token ids (8192 classes) with cross-entropy; mimkit
  never fetches weights at run time, so the default is per-patch normalised pixels with MSE
  over masked patches (the RGB target of Paddle's CAE, MAE's norm-pix). ``target={"type":
  "tokens", "tokenizer": ...}`` trains against a locally held tokenizer (see
  :mod:`mimkit.ssl.cae_targets`).
- **Options the official constructor ignores.** Atten4Vis/CAE reads only ``regressor_depth``,
  ``decoder_embed_dim`` and ``decoder_depth`` from its arguments; ``decoder_num_heads`` (12),
  ``decoder_layer_scale_init_value`` (0.1), ``decoder_num_classes`` and ``fix_init_weight`` keep
  their constructor defaults whatever the command line says. mimkit honours every option. Its
  defaults equal what the official Base runs used: heads follow the encoder (12 for Base; the
  official Large run, whose script also drops its decoder flags, ran 12 heads at width 768),
  layer scale 0.1, and the official (``fix_init_weight=False``) initialisation below.
- **Regressor and decoder drop path** follow the encoder's ``drop_path_rate`` unless
  ``decoder_drop_path_rate`` is given: the official constructor passes one rate to all three.
- **Initialisation** is the official effective one: xavier-uniform for every Linear, encoder
  included (its fused qkv as one matrix), LayerNorm 1/0, truncated normal (std 0.02, cut at
  +-1 std as the official wrapper does) for the patch projection, cls and mask tokens. BEiT's
  depth rescaling is overwritten by the xavier pass in the official code too, so it is not done.
- **Masks** come from mimkit's generators (torch RNG, exact counts) instead of numpy in the data
  loader; the default is block-wise with 98 of 196 patches masked (ratio 0.5). mmpretrain and
  Paddle use 75 of 196: ``{type: block, ratio: 0.38}``.

Official-key correspondence: ``encoder_to_regresser(_norm)`` -> ``to_regressor.0`` / ``.1``,
``rd_pos_embed`` -> ``pos_embed``, ``mask_token`` -> ``mask_token``,
``regresser.regressor_blocks.{i}.{norm1_q, norm1_k, norm1_v, cross_attn.{q,k,v,proj},
cross_attn.q_bias, cross_attn.v_bias, gamma_1_cross, norm2_cross, mlp_cross, gamma_2_cross}`` ->
``regressor.blocks.{i}.{norm_q, norm_k, norm_v, attn.{q,k,v,proj}, attn.q.bias, attn.v.bias,
ls1.gamma, norm2, mlp, ls2.gamma}``, ``regresser.norm`` -> ``regressor.norm``,
``decoder.decoder_blocks.{i}`` -> ``decoder.blocks.{i}`` (timm names), ``decoder.norm``,
``decoder.head`` unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.models import Backbone, sincos_2d
from mimkit.ssl.base import MaskedImageModel
from mimkit.ssl.cae_targets import PixelTarget, build_target
from mimkit.ssl.masking import MaskGenerator, ids_keep, ids_masked
from mimkit.ssl.registry import register_method

_norm = partial(nn.LayerNorm, eps=1e-6)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample selection along dim 1: x (B, L, ...), ids (B, K) -> (B, K, ...)."""
    index = ids.view(*ids.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys and values.

    As the official ``CrossAttention``: separate q, k, v projections, bias on q and v only.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (B, N, D), key and value (B, S, D) -> (B, N, D)."""
        b, n, d = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], self.num_heads, -1).transpose(1, 2)

        x = F.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key)), heads(self.v(value)))
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class RegressorBlock(nn.Module):
    """One block of CAE's latent contextual regressor (official ``RegressorBlock``).

    Only the masked queries are updated; keys and values are the visible latents followed by the
    current queries, positions added to queries and keys but not to values. Note the post-norm
    ``norm2`` and the MLP without a pre-norm, as in the official block.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, init_values: float, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = _norm(dim), _norm(dim), _norm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = _norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor, pos_masked: torch.Tensor, pos_visible: torch.Tensor
    ) -> torch.Tensor:
        """x, pos_masked (B, M, D); visible, pos_visible (B, K, D) -> updated x (B, M, D)."""
        kv = torch.cat([visible, x], dim=1)
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        attn = self.attn(self.norm_q(x + pos_masked), self.norm_k(kv + pos_kv), self.norm_v(kv))
        x = self.norm2(x + self.drop_path(self.ls1(attn)))
        return x + self.drop_path(self.ls2(self.mlp(x)))


class LatentRegressor(nn.Module):
    """Cross-attention blocks predicting masked latents from visible ones, then a LayerNorm."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, mlp_ratio: float, init_values: float, drop_path: float
    ):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, mlp_ratio, init_values, r) for r in rates)
        self.norm = _norm(dim)

    def forward(self, queries, visible, pos_masked, pos_visible) -> torch.Tensor:
        """queries (B, M, D) -> predicted masked latents (B, M, D); ``visible`` is read, never updated."""
        x = queries
        for block in self.blocks:
            x = block(x, visible, pos_masked, pos_visible)
        return self.norm(x)


class CAEDecoder(nn.Module):
    """Self-attention blocks over the masked tokens only, LayerNorm, a linear head per token."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        init_values: float,
        drop_path: float,
        out_dim: int,
    ):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio,
                qkv_bias=True,
                init_values=init_values or None,
                drop_path=r,
                norm_layer=_norm,
            )
            for r in rates
        )
        self.norm = _norm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, latents: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        """latents, pos_masked (B, M, D) -> (B, M, out_dim)."""
        x = latents + pos_masked
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _trunc_normal(tensor: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)  # the official wrapper cuts at +-1 std


def init_cae_weights(model: CAE) -> None:
    """The official effective initialisation (``fix_init_weight=False``), applied to the whole model."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    encoder = model.encoder
    _trunc_normal(encoder.patch_embed.proj.weight)
    nn.init.zeros_(encoder.patch_embed.proj.bias)
    _trunc_normal(encoder.cls_token)
    _trunc_normal(model.mask_token)


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"CAE option {name} must be {allowed}, got {value!r}")


@register_method("cae")
class CAE(MaskedImageModel):
    """Context autoencoder on a registry backbone.

    Args:
        encoder: the backbone, trained and exported (for the official Base recipe built with
            ``init_values=0.1, drop_path_rate=0.1``).
        mask_generator: block-wise, 98 of 196 patches (ratio 0.5), when built by name.
        regressor_depth: cross-attention blocks of the regressor (official 4).
        decoder_depth: self-attention blocks of the decoder (official 4).
        decoder_dim: width of regressor and decoder (official ``decoder_embed_dim``); None: the
            encoder's. Another width adds the official Linear + LayerNorm projection of the
            encoder outputs (and of the alignment targets).
        decoder_heads: heads of regressor and decoder; None: the encoder's.
        decoder_mlp_ratio: MLP hidden width / width in regressor and decoder blocks.
        decoder_init_values: layer-scale init of regressor and decoder blocks (official 0.1);
            0 turns layer scale off.
        decoder_drop_path_rate: stochastic depth of regressor and decoder (a linear ramp over
            each); None: the encoder's rate, as the official code does.
        align_loss_weight: weight of the alignment MSE (official 2).
        target: reconstruction target, a type name or a mapping (see
            :func:`mimkit.ssl.cae_targets.build_target`); None: ``{"type": "pixels",
            "norm_pix": True}``. Tokens: ``{"type": "tokens", "tokenizer": "pkg.mod:factory",
            "vocab_size": 8192}``.
    """

    default_mask = {"type": "block", "ratio": 0.5}

    def __init__(
        self,
        encoder: Backbone,
        mask_generator: MaskGenerator,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        decoder_dim: int | None = None,
        decoder_heads: int | None = None,
        decoder_mlp_ratio: float = 4.0,
        decoder_init_values: float = 0.1,
        decoder_drop_path_rate: float | None = None,
        align_loss_weight: float = 2.0,
        target: str | dict[str, Any] | None = None,
    ):
        if not hasattr(encoder, "forward_visible"):
            raise ValueError(
                f"CAE needs a mimkit Backbone (with forward_visible), got {type(encoder).__name__}"
            )
        dim = encoder.embed_dim if decoder_dim is None else decoder_dim
        heads = encoder.blocks[0].attn.num_heads if decoder_heads is None else decoder_heads
        drop_path = encoder.drop_path_rate if decoder_drop_path_rate is None else decoder_drop_path_rate
        _check(regressor_depth >= 1, "regressor_depth", "at least 1", regressor_depth)
        _check(decoder_depth >= 0, "decoder_depth", "at least 0", decoder_depth)
        _check(heads >= 1, "decoder_heads", "positive or null", decoder_heads)
        _check(
            dim > 0 and dim % 4 == 0 and dim % heads == 0,
            "decoder_dim",
            f"a positive multiple of 4 and of the {heads} heads, or null",
            decoder_dim,
        )
        _check(decoder_mlp_ratio > 0, "decoder_mlp_ratio", "positive", decoder_mlp_ratio)
        _check(
            decoder_init_values >= 0, "decoder_init_values", ">= 0 (0: no layer scale)", decoder_init_values
        )
        _check(0 <= drop_path < 1, "decoder_drop_path_rate", "in [0, 1) or null", decoder_drop_path_rate)
        _check(align_loss_weight >= 0, "align_loss_weight", ">= 0", align_loss_weight)

        super().__init__(encoder, mask_generator)
        self.align_loss_weight = float(align_loss_weight)
        self.patch_size = encoder.patch_size
        if dim != encoder.embed_dim:
            self.to_regressor = nn.Sequential(nn.Linear(encoder.embed_dim, dim), _norm(dim))
        else:
            self.to_regressor = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(dim, encoder.grid_size, cls_token=False)[None], requires_grad=False
        )
        self.regressor = LatentRegressor(
            dim, regressor_depth, heads, decoder_mlp_ratio, decoder_init_values, drop_path
        )
        self.target = build_target(
            target or {"type": "pixels", "norm_pix": True},
            patch_size=self.patch_size,
            in_chans=encoder.in_chans,
        )
        self.decoder = CAEDecoder(
            dim, decoder_depth, heads, decoder_mlp_ratio, decoder_init_values, drop_path, self.target.out_dim
        )
        init_cae_weights(self)

    @property
    def norm_pix_loss(self) -> bool:
        """Whether predictions are in per-patch standardised pixel units (for visualisation)."""
        return bool(getattr(self.target, "norm_pix", False))

    def forward(self, batch: dict, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One CAE step on ``batch["image"]`` (B, C, H, W).

        Args:
            mask: optional (B, L) bool, True = masked, the same count in every sample; drawn from
                the mask generator (torch's default RNG) when not given.

        Returns:
            ``loss``, ``loss_rec``, ``loss_align`` (scalars; plus what the target adds, e.g.
            ``mlm_acc``), ``latent_pred`` and ``latent_target`` (B, M, D) in masked-index order,
            ``patch_mask`` (B, L); for pixel targets ``pred`` (B, L, p*p*C) detached, zero at
            visible patches; for other targets ``logits`` (B, M, out_dim).
        """
        images = batch["image"]
        b = images.shape[0]
        if mask is None:
            mask = self.draw_mask(b, images.device)
        keep, masked = ids_keep(mask), ids_masked(mask)

        visible = self.to_regressor(self.encoder.forward_visible(images, keep)[:, 1:])
        with torch.no_grad():  # the alignment target: the same encoder, on the masked patches
            latent_target = self.to_regressor(self.encoder.forward_visible(images, masked)[:, 1:])

        pos = self.pos_embed.expand(b, -1, -1)
        pos_visible, pos_masked = gather_tokens(pos, keep), gather_tokens(pos, masked)
        queries = self.mask_token.expand(b, masked.shape[1], -1)
        latent_pred = self.regressor(queries, visible, pos_masked, pos_visible)
        pred = self.decoder(latent_pred, pos_masked)

        target = self.target(images)
        if target.shape[:2] != mask.shape:
            raise ValueError(
                f"the {type(self.target).__name__} gave targets of shape {tuple(target.shape)}; "
                f"expected one per patch, ({b}, {mask.shape[1]}, ...)"
            )
        out = self.target.loss(pred, gather_tokens(target, masked))
        out["loss_align"] = F.mse_loss(latent_pred.float(), latent_target.float())
        out["loss"] = out["loss_rec"] + self.align_loss_weight * out["loss_align"]
        out.update(latent_pred=latent_pred, latent_target=latent_target, patch_mask=mask)
        if isinstance(self.target, PixelTarget):
            full = pred.new_zeros(b, mask.shape[1], pred.shape[-1])
            out["pred"] = full.scatter(1, masked[..., None].expand_as(pred), pred.detach())
        else:
            out["logits"] = pred
        return out
