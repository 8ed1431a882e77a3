"""Official MAE and CAE layouts -> mimkit: forwards equal the reference computed from the official tensors."""

from __future__ import annotations

import pytest
import torch

from mimkit.interop import cae_to_mimkit, mae_to_mimkit
from mimkit.interop.cae import half_swap
from mimkit.models import sincos_2d
from tests.interop import DIM, GRID, HEADS, IMG, official_cae, official_mae, reference_vit


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder", [False, True])
def test_mae_encoder_forward_equals_official_reference(decoder):
    sd = official_mae(decoder=decoder)
    out = mae_to_mimkit(sd, num_heads=HEADS)
    x = _images()
    with torch.no_grad():
        got = out.encoder.eval().forward_features(x)
    torch.testing.assert_close(got, reference_vit(sd, x), atol=1e-5, rtol=1e-5)
    assert out.model is None
    assert any(k.startswith("decoder_blocks.") for k in out.dropped) == decoder
    assert out.encoder.config["pos_embed"] == "sincos"  # the stored table is MAE's sin-cos


def test_mae_keep_decoder_builds_full_model():
    sd = official_mae(dec_dim=16, dec_depth=2)
    out = mae_to_mimkit(sd, keep_decoder=True, num_heads=HEADS, decoder_heads=2)
    model = out.model
    assert out.method_cfg["decoder_dim"] == 16 and out.method_cfg["decoder_depth"] == 2
    dec = model.decoder
    torch.testing.assert_close(dec.embed.weight, sd["decoder_embed.weight"])
    torch.testing.assert_close(dec.mask_token, sd["mask_token"])
    torch.testing.assert_close(dec.blocks[1].attn.qkv.bias, sd["decoder_blocks.1.attn.qkv.bias"])
    torch.testing.assert_close(dec.pred.weight, sd["decoder_pred.weight"])
    with torch.no_grad():  # the converted model runs as a mimkit MAE
        res = model({"image": _images()})
    assert torch.isfinite(res["loss"])


def test_mae_keep_decoder_needs_a_decoder():
    with pytest.raises(ValueError, match="keep_decoder needs a checkpoint with the MAE decoder"):
        mae_to_mimkit(official_mae(decoder=False), keep_decoder=True, num_heads=HEADS)


def test_mae_finetune_checkpoint_drops_head_and_keeps_fc_norm():
    sd = official_mae(decoder=False)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    sd["head.weight"], sd["head.bias"] = torch.randn(10, DIM), torch.randn(10)
    out = mae_to_mimkit(sd, num_heads=HEADS)
    assert sorted(out.dropped) == ["head.bias", "head.weight"]
    torch.testing.assert_close(out.encoder.norm.weight, sd["fc_norm.weight"])


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_cae_encoder_forward_equals_official_reference(full, swap):
    sd = official_cae(full=full)
    out = cae_to_mimkit(sd, num_heads=HEADS, swap_pos_layout=swap)
    x = _images()
    with torch.no_grad():
        got = out.encoder.eval().forward_features(x)
    ref = reference_vit(sd, x, prefix="encoder." if full else "")
    if swap:  # a fixed relabelling of channels: the halves swap, nothing else changes
        ref = ref[..., half_swap(DIM)]
        torch.testing.assert_close(out.encoder.pos_embed, sincos_2d(DIM, GRID)[None])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    pretext = {k for k in sd if not k.startswith("encoder.")} if full else set()
    assert set(out.dropped) == pretext  # alignment encoder, regressor and decoder; no encoder key
    blk = out.encoder.blocks[0]
    q_bias = sd[("encoder." if full else "") + "blocks.0.attn.q_bias"]
    torch.testing.assert_close(blk.attn.qkv.bias[DIM : 2 * DIM], torch.zeros(DIM))  # zero key bias
    torch.testing.assert_close(blk.attn.qkv.bias[:DIM], q_bias)  # head space: never relabelled


@pytest.mark.parametrize("dec_dim", [DIM, 16])
def test_cae_full_model_swap_preserves_the_function(dec_dim):
    """Both conversions of one official checkpoint give the same CAE outputs, latents relabelled."""
    sd = official_cae(dec_dim=dec_dim)
    kept = cae_to_mimkit(sd, keep_decoder=True, num_heads=HEADS, decoder_heads=2, swap_pos_layout=False)
    swapped = cae_to_mimkit(sd, keep_decoder=True, num_heads=HEADS, decoder_heads=2, swap_pos_layout=True)
    reg = kept.model.regressor.blocks[1]
    p = "regresser.regressor_blocks.1."
    torch.testing.assert_close(reg.attn.q.bias, sd[p + "cross_attn.q_bias"])
    torch.testing.assert_close(reg.attn.k.weight, sd[p + "cross_attn.k.weight"])
    torch.testing.assert_close(reg.ls2.gamma, sd[p + "gamma_2_cross"])
    torch.testing.assert_close(reg.norm_q.bias, sd[p + "norm1_q.bias"])
    torch.testing.assert_close(kept.model.pos_embed, sd["rd_pos_embed"][:, 1:])
    torch.testing.assert_close(swapped.model.pos_embed, sincos_2d(dec_dim, GRID, cls_token=False)[None])
    torch.testing.assert_close(kept.model.decoder.head.weight, sd["decoder.head.weight"])

    mask = torch.zeros(2, GRID[0] * GRID[1], dtype=torch.bool)
    mask[:, ::2] = True
    batch = {"image": _images()}
    with torch.no_grad():
        a = kept.model.eval()(batch, mask=mask)
        b = swapped.model.eval()(batch, mask=mask)
    torch.testing.assert_close(a["pred"], b["pred"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["loss_align"], b["loss_align"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(
        a["latent_pred"][..., half_swap(dec_dim)], b["latent_pred"], atol=1e-5, rtol=1e-4
    )
    assert any(k.startswith("alignment_encoder.") for k in kept.dropped)


def test_cae_token_head_is_reported_not_loaded():
    out = cae_to_mimkit(official_cae(head_out=50), keep_decoder=True, num_heads=HEADS, decoder_heads=2)
    assert "decoder.head.weight" in out.dropped
    assert out.model.decoder.head.weight.shape[0] == 8 * 8 * 3


def test_cae_relative_position_bias_is_refused():
    sd = official_cae(full=False)
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(10, HEADS)
    with pytest.raises(
        ValueError, match="relative position bias is not supported.*relative_position_bias_table"
    ):
        cae_to_mimkit(sd, num_heads=HEADS)
