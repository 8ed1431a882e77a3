"""Official MAE checkpoints (facebookresearch/mae) -> a mimkit encoder, or a full mimkit MAE.

Encoder keys are already timm's (``mae_pretrain_vit_*.pth`` loads into timm unchanged). The
decoder of a ``*_full.pth`` / ``mae_visualize_*.pth`` checkpoint maps one to one onto
:class:`mimkit.ssl.decoder.MAEDecoder`: ``decoder_embed`` -> ``decoder.embed``,
``mask_token`` -> ``decoder.mask_token``, ``decoder_pos_embed`` -> ``decoder.pos_embed``,
``decoder_blocks`` -> ``decoder.blocks``, ``decoder_norm`` -> ``decoder.norm``,
``decoder_pred`` -> ``decoder.pred``. Both position tables use MAE's column-first sin-cos layout,
which is mimkit's, so nothing is permuted. Fine-tuning checkpoints (``head``, ``fc_norm``) lose
their classifier and keep ``fc_norm`` as the encoder's final norm.
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
    load_strict,
    resample_encoder_state,
    resample_table,
)

DECODER_RENAMES = {
    "decoder_embed.": "decoder.embed.",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.pos_embed",
    "decoder_blocks.": "decoder.blocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}
_DECODER_BLOCK = re.compile(r"^decoder\.blocks\.(\d+)\.")


def _is_decoder_key(key: str) -> bool:
    return any(key == old or (old.endswith(".") and key.startswith(old)) for old in DECODER_RENAMES)


def split_mae_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Split an official MAE state dict into (encoder, decoder in mimkit names, dropped keys)."""
    encoder, decoder = {}, {}
    for key, value in state.items():
        for old, new in DECODER_RENAMES.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                decoder[new + key[len(old) :]] = value
                break
        else:
            encoder[key] = value
    encoder, dropped = clean_timm_state(encoder)
    return encoder, decoder, dropped


def mae_to_mimkit(
    state: dict[str, torch.Tensor],
    *,
    keep_decoder: bool = False,
    num_heads: int | None = None,
    decoder_heads: int = 16,
    norm_pix_loss: bool = True,
    img_size: int | tuple[int, int] | None = None,
) -> Converted:
    """Convert an official MAE pretraining or fine-tuning state dict.

    Args:
        keep_decoder: also build a full mimkit MAE from the decoder keys (resume, visualise);
            otherwise they are dropped.
        num_heads: encoder heads (default: the preset of the width).
        decoder_heads: decoder heads (16 in every official model; shapes cannot tell).
        norm_pix_loss: the full model's target (``*_full.pth`` used normalised pixels,
            ``mae_visualize_*.pth`` plain ones).
        img_size: resample the position tables to this image size.
    """
    enc_state, dec_state, dropped = split_mae_state(state)
    notes = [f"dropped the classifier keys {', '.join(dropped)}"] if dropped else []
    if not keep_decoder:
        if dec_state:
            notes.append(f"dropped the {len(dec_state)} decoder tensors (keep_decoder=False)")
            dropped += sorted(k for k in state if _is_decoder_key(k))
        encoder = encoder_from_state(enc_state, num_heads=num_heads, img_size=img_size)
        return Converted(encoder=encoder, dropped=dropped, notes=notes)

    if "decoder.embed.weight" not in dec_state:
        raise ValueError(
            "keep_decoder needs a checkpoint with the MAE decoder (decoder_embed, decoder_blocks, ...; "
            "e.g. mae_pretrain_vit_base_full.pth); this one holds the encoder only"
        )
    from mimkit.ssl import build_method

    old_arch = infer_arch(enc_state, num_heads=num_heads)
    if img_size is not None:
        patch = old_arch["patch_size"]
        old_grid = grid_of(enc_state["pos_embed"], 1, None, patch)
        enc_state = resample_encoder_state(enc_state, img_size)
        new_grid = grid_of(enc_state["pos_embed"], 1, img_size, patch)
        dec_state["decoder.pos_embed"] = resample_table(dec_state["decoder.pos_embed"], old_grid, new_grid)
    arch = infer_arch(enc_state, num_heads=num_heads, img_size=img_size)
    embed = dec_state["decoder.embed.weight"]
    depth = 1 + max(int(m.group(1)) for k in dec_state if (m := _DECODER_BLOCK.match(k)))
    cfg = {
        "name": "mae",
        "backbone": arch,
        "decoder_dim": embed.shape[0],
        "decoder_depth": depth,
        "decoder_heads": decoder_heads,
        "decoder_mlp_ratio": dec_state["decoder.blocks.0.mlp.fc1.weight"].shape[0] / embed.shape[0],
        "norm_pix_loss": norm_pix_loss,
    }
    model = build_method(cfg)
    full = {**{f"encoder.{k}": v for k, v in enc_state.items()}, **dec_state}
    load_strict(model, full, f"a mimkit MAE ({depth}-block, {embed.shape[0]}-wide decoder)")
    notes.append(
        f"kept the decoder; decoder heads {decoder_heads}, norm_pix_loss={norm_pix_loss} (not in the file)"
    )
    return Converted(encoder=model.encoder, model=model, method_cfg=cfg, dropped=dropped, notes=notes)
