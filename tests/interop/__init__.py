"""Official-layout state dicts (random tensors, tiny sizes) and reference forwards from the papers.

Key lists follow facebookresearch/mae (``models_mae.py``) and Atten4Vis/CAE
(``models/modeling_cae.py``) as recorded in the project's method reference (sections 1.6, 2.6).
The reference forward is written from the definitions: pre-norm blocks
``x + g1 * Attn(LN1(x))``, ``x + g2 * MLP(LN2(x))``, softmax(q k^T / sqrt(d)) v per head, and
for CAE/BEiT a qkv bias of ``[q_bias, 0, v_bias]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS, PATCH, IMG = 32, 2, 2, 8, 32
GRID = (IMG // PATCH, IMG // PATCH)


def sincos_table(dim: int, grid: tuple[int, int], row_first: bool, cls_row: bool = True) -> torch.Tensor:
    """(1, [1 +] rows*cols, dim): [sin(a w), cos(a w), sin(b w), cos(b w)], w_k = 10000^(-k/(dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            a, b = (r, c) if row_first else (c, r)
            rows.append(
                torch.cat([(a * omega).sin(), (a * omega).cos(), (b * omega).sin(), (b * omega).cos()])
            )
    table = torch.stack(rows)
    if cls_row:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table])
    return table[None].float()


def _r(g: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _norm(g: torch.Generator, out: dict, key: str, dim: int) -> None:
    out[f"{key}.weight"] = 1 + _r(g, dim, scale=0.1)
    out[f"{key}.bias"] = _r(g, dim, scale=0.1)


def _block(g, out: dict, p: str, dim: int, beit: bool, mlp: int = 4) -> None:
    _norm(g, out, p + "norm1", dim)
    out[p + "attn.qkv.weight"] = _r(g, 3 * dim, dim)
    if beit:
        out[p + "attn.q_bias"] = _r(g, dim)
        out[p + "attn.v_bias"] = _r(g, dim)
        out[p + "gamma_1"] = 0.1 + _r(g, dim, scale=0.05)
        out[p + "gamma_2"] = 0.1 + _r(g, dim, scale=0.05)
    else:
        out[p + "attn.qkv.bias"] = _r(g, 3 * dim)
    out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = _r(g, dim, dim), _r(g, dim)
    _norm(g, out, p + "norm2", dim)
    out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = _r(g, mlp * dim, dim), _r(g, mlp * dim)
    out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = _r(g, dim, mlp * dim), _r(g, dim)


def _encoder(g, beit: bool, row_first: bool, prefix: str = "") -> dict:
    out = {
        prefix + "cls_token": _r(g, 1, 1, DIM),
        prefix + "pos_embed": sincos_table(DIM, GRID, row_first),
        prefix + "patch_embed.proj.weight": _r(g, DIM, 3, PATCH, PATCH, scale=0.05),
        prefix + "patch_embed.proj.bias": _r(g, DIM),
    }
    for i in range(DEPTH):
        _block(g, out, f"{prefix}blocks.{i}.", DIM, beit)
    _norm(g, out, prefix + "norm", DIM)
    return out


def official_mae(seed: int = 0, decoder: bool = True, dec_dim: int = 16, dec_depth: int = 2) -> dict:
    """facebookresearch/mae ``*_full.pth`` layout (encoder-only when ``decoder`` is False)."""
    g = torch.Generator().manual_seed(seed)
    out = _encoder(g, beit=False, row_first=False)
    if decoder:
        out["mask_token"] = _r(g, 1, 1, dec_dim)
        out["decoder_pos_embed"] = sincos_table(dec_dim, GRID, row_first=False)
        out["decoder_embed.weight"], out["decoder_embed.bias"] = _r(g, dec_dim, DIM), _r(g, dec_dim)
        for i in range(dec_depth):
            _block(g, out, f"decoder_blocks.{i}.", dec_dim, beit=False)
        _norm(g, out, "decoder_norm", dec_dim)
        out["decoder_pred.weight"] = _r(g, PATCH * PATCH * 3, dec_dim)
        out["decoder_pred.bias"] = _r(g, PATCH * PATCH * 3)
    return out


def official_cae(
    seed: int = 0, full: bool = True, dec_dim: int = DIM, head_out: int = PATCH * PATCH * 3
) -> dict:
    """Atten4Vis/CAE layout: ``encoder.*`` + regressor + decoder (or the released encoder-only keys)."""
    g = torch.Generator().manual_seed(seed)
    if not full:
        return _encoder(g, beit=True, row_first=True)
    out = _encoder(g, beit=True, row_first=True, prefix="encoder.")
    out.update({"alignment_encoder." + k[len("encoder.") :]: v.clone() for k, v in out.items()})
    out["rd_pos_embed"] = sincos_table(dec_dim, GRID, row_first=True)
    out["mask_token"] = _r(g, 1, 1, dec_dim)
    if dec_dim != DIM:
        out["encoder_to_regresser.weight"] = _r(g, dec_dim, DIM)
        out["encoder_to_regresser.bias"] = _r(g, dec_dim)
        _norm(g, out, "encoder_to_regresser_norm", dec_dim)
    for i in range(2):
        p = f"regresser.regressor_blocks.{i}."
        for n in ("norm1_q", "norm1_k", "norm1_v", "norm2_cross"):
            _norm(g, out, p + n, dec_dim)
        for n in ("q", "k", "v"):
            out[f"{p}cross_attn.{n}.weight"] = _r(g, dec_dim, dec_dim)
        out[p + "cross_attn.q_bias"], out[p + "cross_attn.v_bias"] = _r(g, dec_dim), _r(g, dec_dim)
        out[p + "cross_attn.proj.weight"], out[p + "cross_attn.proj.bias"] = (
            _r(g, dec_dim, dec_dim),
            _r(g, dec_dim),
        )
        out[p + "mlp_cross.fc1.weight"], out[p + "mlp_cross.fc1.bias"] = (
            _r(g, 4 * dec_dim, dec_dim),
            _r(g, 4 * dec_dim),
        )
        out[p + "mlp_cross.fc2.weight"], out[p + "mlp_cross.fc2.bias"] = (
            _r(g, dec_dim, 4 * dec_dim),
            _r(g, dec_dim),
        )
        out[p + "gamma_1_cross"] = 0.1 + _r(g, dec_dim, scale=0.05)
        out[p + "gamma_2_cross"] = 0.1 + _r(g, dec_dim, scale=0.05)
    _norm(g, out, "regresser.norm", dec_dim)
    for i in range(2):
        _block(g, out, f"decoder.decoder_blocks.{i}.", dec_dim, beit=True)
    _norm(g, out, "decoder.norm", dec_dim)
    out["decoder.head.weight"], out["decoder.head.bias"] = _r(g, head_out, dec_dim), _r(g, head_out)
    return out


def reference_vit(sd: dict, images: torch.Tensor, heads: int = HEADS, prefix: str = "") -> torch.Tensor:
    """All-token ViT forward from official-layout tensors: (B, 1 + L, D), final norm applied."""

    def t(name: str) -> torch.Tensor:
        return sd[prefix + name]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], t(name + ".weight"), t(name + ".bias"), eps=1e-6)

    x = F.conv2d(images, t("patch_embed.proj.weight"), t("patch_embed.proj.bias"), stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + t("pos_embed")
    b, n, d = x.shape
    depth = 1 + max(int(k[len(prefix) :].split(".")[1]) for k in sd if k.startswith(prefix + "blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        if prefix + p + "attn.q_bias" in sd:  # BEiT: learnable q and v biases, the key bias fixed at 0
            q_b = t(p + "attn.q_bias")
            bias = torch.cat([q_b, torch.zeros_like(q_b), t(p + "attn.v_bias")])
        else:
            bias = t(p + "attn.qkv.bias")
        g1 = t(p + "gamma_1") if prefix + p + "gamma_1" in sd else 1.0
        g2 = t(p + "gamma_2") if prefix + p + "gamma_2" in sd else 1.0
        qkv = ln(x, p + "norm1") @ t(p + "attn.qkv.weight").T + bias
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + g1 * (o @ t(p + "attn.proj.weight").T + t(p + "attn.proj.bias"))
        h = F.gelu(ln(x, p + "norm2") @ t(p + "mlp.fc1.weight").T + t(p + "mlp.fc1.bias"))
        x = x + g2 * (h @ t(p + "mlp.fc2.weight").T + t(p + "mlp.fc2.bias"))
    return ln(x, "norm")
