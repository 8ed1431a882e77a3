"""Official CAE checkpoints (Atten4Vis/CAE) -> a mimkit encoder, or a full mimkit CAE.

The encoder's blocks are BEiT's: ``attn.qkv`` without bias plus learnable ``attn.q_bias`` and
``attn.v_bias``, and layer scale ``gamma_1`` / ``gamma_2``. timm's ViT holds one fused bias, so
``qkv.bias = [q_bias, 0, v_bias]`` (a zero key bias: CAE fixes it at zero, and a key bias adds
the same logit to every key of a query, which softmax cancels) and ``gamma_i -> ls{i}.gamma``.
Relative position bias (BEiT fine-tuning) has no place in timm's ViT and is refused.

Position tables: CAE's sin-cos tables put the row coordinate in the first half of the channels,
mimkit (MAE) the column. With ``swap_pos_layout=True`` (default) the converter relabels the
residual-stream channels of the whole network by swapping their halves: every weight that reads
or writes the stream is permuted accordingly (LayerNorm is permutation-equivariant), so the
network computes the same function, its tables become exactly mimkit's, and a table mimkit
regenerates (another image size, a new regressor) matches the weights. The price: encoder
features come out with their channel halves swapped relative to the official code
(``features_mimkit = features_official[..., swap]``); a linear probe or fine-tuning does not care.
``swap_pos_layout=False`` keeps every tensor as it is (features identical to the official code).

The regressor and decoder map onto :class:`mimkit.ssl.cae.CAE` by the key correspondence at the
end of that module's docstring.
"""

from __future__ import annotations

import re

import torch

from mimkit.interop.timm import (
    Converted,
    clean_timm_state,
    encoder_from_state,
    grid_of,
    infer_arch,
    is_sincos,
    load_strict,
    resample_encoder_state,
    resample_table,
)
from mimkit.models import sincos_2d

# Official regressor block names -> mimkit's RegressorBlock names (after ``regressor.blocks.{i}.``).
REGRESSOR_RENAMES = {
    "norm1_q.": "norm_q.",
    "norm1_k.": "norm_k.",
    "norm1_v.": "norm_v.",
    "cross_attn.q.": "attn.q.",
    "cross_attn.k.": "attn.k.",
    "cross_attn.v.": "attn.v.",
    "cross_attn.q_bias": "attn.q.bias",
    "cross_attn.v_bias": "attn.v.bias",
    "cross_attn.proj.": "attn.proj.",
    "gamma_1_cross": "ls1.gamma",
    "norm2_cross.": "norm2.",
    "mlp_cross.": "mlp.",
    "gamma_2_cross": "ls2.gamma",
}
_DROPPED_PREFIXES = ("alignment_encoder.", "teacher.")
_REL_POS = ("relative_position_bias_table", "rel_pos_bias.")
_INDEX = re.compile(r"^(?:regressor|decoder)\.blocks\.(\d+)\.")

# Which axis of a tensor runs over the residual stream, by key ending (see swap_halves).
_STREAM_LAST = re.compile(r"(^|\.)(cls_token|pos_embed|mask_token)$")
_STREAM_OUT = re.compile(
    r"(patch_embed\.proj\.(weight|bias)|norm\w*\.(weight|bias)|attn\.proj\.(weight|bias)"
    r"|mlp\.fc2\.(weight|bias)|ls[12]\.gamma)$"
)
_STREAM_IN = re.compile(r"(attn\.(qkv|q|k|v)\.weight|mlp\.fc1\.weight|head\.weight)$")


def beit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BEiT block names -> timm ViT names: fused qkv bias with a zero key bias, ``ls{i}.gamma``."""
    refused = sorted(k for k in state if any(r in k for r in _REL_POS))
    if refused:
        raise ValueError(
            "relative position bias is not supported (timm's VisionTransformer, and so mimkit's "
            f"encoder, has none): {', '.join(refused[:6])}. Load this checkpoint into timm's Beit instead."
        )
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue  # a constant buffer, only meaningful with a bias table
        if key.endswith(".attn.v_bias"):
            continue  # merged with its q_bias below
        if key.endswith(".attn.q_bias"):
            stem = key[: -len("q_bias")]
            v_bias = state[stem + "v_bias"]
            out[stem + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif key.endswith(".gamma_1") or key.endswith(".gamma_2"):
            out[f"{key[: -len('gamma_1')]}ls{key[-1]}.gamma"] = value
        else:
            out[key] = value
    return out


def half_swap(dim: int) -> torch.Tensor:
    """Channel order that swaps the two halves: ``new[..., j] = old[..., swap[j]]``."""
    return torch.cat([torch.arange(dim // 2, dim), torch.arange(0, dim // 2)])


def swap_halves(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Relabel the ``dim``-wide residual stream of ``state`` (one stream, timm / mimkit names)."""
    perm = half_swap(dim)
    out = {}
    for key, value in state.items():
        if _STREAM_LAST.search(key):
            value = value.index_select(-1, perm)
        elif _STREAM_OUT.search(key):
            value = value.index_select(0, perm)
        elif _STREAM_IN.search(key):
            value = value.index_select(1, perm)
        out[key] = value
    return out


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _pretext_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Regressor, decoder, mask token and tables of an official checkpoint, in mimkit CAE names."""
    out = {}
    for key, value in state.items():
        if key.startswith("regresser.regressor_blocks."):
            index, rest = key[len("regresser.regressor_blocks.") :].split(".", 1)
            out[f"regressor.blocks.{index}.{_rename(rest, REGRESSOR_RENAMES)}"] = value
        elif key.startswith("regresser.norm."):
            out["regressor." + key[len("regresser.") :]] = value
        elif key.startswith("decoder.decoder_blocks."):
            out["decoder.blocks." + key[len("decoder.decoder_blocks.") :]] = value
        elif key.startswith("decoder.") or key == "mask_token":
            out[key] = value
        elif key.startswith("encoder_to_regresser_norm."):
            out["to_regressor.1." + key[len("encoder_to_regresser_norm.") :]] = value
        elif key.startswith("encoder_to_regresser."):
            out["to_regressor.0." + key[len("encoder_to_regresser.") :]] = value
        elif key == "rd_pos_embed":
            out["pos_embed"] = value
        else:
            out[key] = value  # left for the strict load to name as unexpected
    return beit_to_timm(out)


def cae_to_mimkit(
    state: dict[str, torch.Tensor],
    *,
    keep_decoder: bool = False,
    num_heads: int | None = None,
    decoder_heads: int = 12,
    img_size: int | tuple[int, int] | None = None,
    swap_pos_layout: bool = True,
) -> Converted:
    """Convert an official CAE state dict (full ``encoder.*`` model or released encoder-only).

    Args:
        keep_decoder: also build a full mimkit CAE from the regressor and decoder keys.
        num_heads: encoder heads (default: the preset of the width).
        decoder_heads: regressor and decoder heads (12 in every official run; shapes cannot tell).
        img_size: resample the position tables to this image size; also the image size of a
            checkpoint that stores no encoder table (default 224 there).
        swap_pos_layout: relabel channels so the tables are mimkit's (module docstring).
    """
    full = any(k.startswith("encoder.") for k in state)
    dropped = sorted(k for k in state if k.startswith(_DROPPED_PREFIXES))
    notes = (
        [f"dropped the {len(dropped)} alignment-encoder tensors (a copy of the encoder)"] if dropped else []
    )
    enc = _strip(state, "encoder.") if full else dict(state)
    # Everything outside the encoder: regressor, decoder, mask token, tables (full checkpoints only).
    rest = (
        {k: v for k, v in state.items() if not k.startswith(("encoder.", *_DROPPED_PREFIXES))} if full else {}
    )
    if not full:
        enc = {k: v for k, v in enc.items() if not k.startswith(_DROPPED_PREFIXES)}
    enc = beit_to_timm(enc)
    enc, head_keys = clean_timm_state(enc)
    dropped += head_keys

    if "patch_embed.proj.weight" not in enc:
        raise ValueError(
            f"not a CAE encoder state dict: no patch_embed.proj.weight (keys: {', '.join(list(state)[:8])})"
        )
    dim, patch = enc["patch_embed.proj.weight"].shape[0], enc["patch_embed.proj.weight"].shape[-1]
    swap = half_swap(dim)
    if "pos_embed" not in enc:
        size = img_size or 224
        grid = grid_of(torch.zeros(1, 1, dim), 1, size, patch)
        enc["pos_embed"] = sincos_2d(dim, grid)[None].index_select(-1, half_swap(dim))  # CAE's row-first
        notes.append(f"the checkpoint stores no encoder position table; generated CAE's for {size}px")
    grid = grid_of(enc["pos_embed"], 1, None, patch)
    row_first = is_sincos(enc["pos_embed"].index_select(-1, swap), grid)
    swapped = swap_pos_layout and row_first
    if swapped:
        enc = swap_halves(enc, dim)
        notes.append(
            "relabelled channels (halves swapped) so the position tables are mimkit's column-first layout"
        )
    elif swap_pos_layout:
        notes.append("the encoder table is not CAE's sin-cos table (fine-tuned?); kept every tensor as it is")
    extra = {"converted_channels": "halves-swapped" if swapped else "as-is"}

    if not keep_decoder:
        if rest:
            dropped += sorted(rest)
            notes.append(f"dropped the {len(rest)} regressor/decoder tensors (keep_decoder=False)")
        encoder = encoder_from_state(enc, num_heads=num_heads, img_size=img_size)
        return Converted(encoder=encoder, dropped=dropped, notes=notes, extra=extra)

    from mimkit.ssl import build_method

    pretext = _pretext_state(rest)
    if "mask_token" not in pretext or not any(k.startswith("regressor.blocks.") for k in pretext):
        raise ValueError(
            "keep_decoder needs a full CAE checkpoint (mask_token, regresser.*, decoder.*); this one holds "
            "the encoder only"
        )
    dec_dim = pretext["mask_token"].shape[-1]
    if "pos_embed" not in pretext:
        raise ValueError("the CAE checkpoint has a regressor but no rd_pos_embed table")
    table = pretext["pos_embed"]
    if table.shape[1] == grid[0] * grid[1] + 1:
        table = table[:, 1:]  # the official table has an unused zero cls row
    pretext["pos_embed"] = table
    if swapped:
        to_reg = {k: v for k, v in pretext.items() if k.startswith("to_regressor.")}
        pretext = swap_halves({k: v for k, v in pretext.items() if k not in to_reg}, dec_dim)
        d_perm = half_swap(dec_dim)
        for key, value in to_reg.items():
            value = value.index_select(0, d_perm)
            if key == "to_regressor.0.weight":
                value = value.index_select(1, swap)
            pretext[key] = value
    if img_size is not None:
        enc = resample_encoder_state(enc, img_size)
        new_grid = grid_of(enc["pos_embed"], 1, None, patch)
        pretext["pos_embed"] = resample_table(pretext["pos_embed"], grid, new_grid, num_prefix=0)

    def count(prefix: str) -> int:
        found = [int(m.group(1)) for k in pretext if k.startswith(prefix) and (m := _INDEX.match(k))]
        return 1 + max(found) if found else 0

    cfg = {
        "name": "cae",
        "backbone": infer_arch(enc, num_heads=num_heads),
        "regressor_depth": count("regressor."),
        "decoder_depth": count("decoder."),
        "decoder_dim": dec_dim,
        "decoder_heads": decoder_heads,
        "decoder_mlp_ratio": pretext["regressor.blocks.0.mlp.fc1.weight"].shape[0] / dec_dim,
        "decoder_init_values": 0.1 if "regressor.blocks.0.ls1.gamma" in pretext else 0.0,
    }
    model = build_method(cfg)
    expected = model.state_dict()
    for key in ("decoder.head.weight", "decoder.head.bias"):
        if key in pretext and pretext[key].shape != expected[key].shape:
            # The official head predicts DALL-E tokens (8192); mimkit's default head predicts pixels.
            dropped.append(key)
            notes.append(
                f"{key} {tuple(pretext[key].shape)} does not fit mimkit's pixel head; left at its init"
            )
            pretext[key] = expected[key]
    for key in ("regressor.blocks.{}.attn.q.bias", "regressor.blocks.{}.attn.v.bias"):
        for i in range(cfg["regressor_depth"]):
            pretext.setdefault(key.format(i), torch.zeros(dec_dim))  # official qkv_bias=False has none
    merged = {**{f"encoder.{k}": v for k, v in enc.items()}, **pretext}
    load_strict(
        model,
        merged,
        f"a mimkit CAE ({cfg['regressor_depth']} regressor, {cfg['decoder_depth']} decoder blocks)",
    )
    notes.append(f"kept regressor and decoder; decoder heads {decoder_heads} (not in the file)")
    return Converted(
        encoder=model.encoder, model=model, method_cfg=cfg, dropped=dropped, notes=notes, extra=extra
    )
