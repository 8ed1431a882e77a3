"""timm <-> mimkit: strict round trips, export JSON, architecture inference, position resampling."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import mimkit
from mimkit.interop import (
    encoder_from_state,
    infer_arch,
    load_timm_export,
    resample_encoder_state,
    save_timm_export,
    timm_export_config,
    timm_to_mimkit,
)
from mimkit.models import create_backbone

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _timm_model(name: str = "vit_tiny_patch16_224", img: int = 32, patch: int = 8, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, num_classes=0, img_size=img, patch_size=patch, **kw
    ).eval()


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "name, kw",
    [("vit_tiny_patch16_224", {"depth": 2}), ("vit_small_patch16_224", {"depth": 1, "init_values": 1e-5})],
)
def test_timm_to_mimkit_to_timm_round_trip_is_identical(name, kw, tmp_path):
    src = _timm_model(name, **kw)
    state = src.state_dict()
    out = timm_to_mimkit(state)  # heads from the preset of the width
    assert out.encoder.config["num_heads"] == src.blocks[0].attn.num_heads
    exported = mimkit.export_timm(out.encoder)
    assert exported.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(exported[key], value), key
    # The written export builds the timm model it names and loads strictly; features agree.
    save_timm_export(out.encoder, tmp_path)
    back = load_timm_export(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(_images()), src.forward_features(_images()))
        torch.testing.assert_close(
            out.encoder.eval().forward_features(_images()), src.forward_features(_images())
        )


def test_export_json_names_model_and_preprocessing(tmp_path):
    enc = create_backbone("vit_tiny_patch16", img_size=48, patch_size=8, **TINY)
    cfg = json.loads(save_timm_export(enc, tmp_path).read_text())
    assert cfg == timm_export_config(enc)
    assert cfg["timm_model"] == "vit_tiny_patch16_224"
    assert cfg["timm_kwargs"]["img_size"] == [48, 48] and cfg["timm_kwargs"]["num_classes"] == 0
    pre = cfg["preprocessing"]
    assert pre["input_size"] == [3, 48, 48]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx(
        [0.229, 0.224, 0.225]
    )
    model = timm.create_model(cfg["timm_model"], **{**cfg["timm_kwargs"], "img_size": 48})
    model.load_state_dict(mimkit.export_timm(enc), strict=True)  # what downstream code does


def test_classifier_is_dropped_and_named():
    src = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=1)
    out = timm_to_mimkit(src.state_dict())
    assert sorted(out.dropped) == ["head.bias", "head.weight"]


def test_mismatch_names_missing_and_unexpected_keys():
    state = _timm_model(depth=2).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"missing keys \(1\): blocks.1.mlp.fc2.bias(.|\n)*unexpected keys \(1\): blocks.0.attn.extra",
    ):
        timm_to_mimkit(state)


def test_heads_need_a_preset_or_an_override():
    state = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, **TINY).state_dict()
    with pytest.raises(ValueError, match="cannot tell the heads of a 32-wide ViT.*num_heads"):
        infer_arch(state)
    arch = infer_arch(state, num_heads=4)
    assert (arch["depth"], arch["embed_dim"], arch["num_heads"], arch["img_size"]) == (2, 32, 4, 32)
    with pytest.raises(ValueError, match="num_heads 5 does not divide the width 32"):
        infer_arch(state, num_heads=5)


def test_resampled_learned_table_gives_a_working_model_and_leaves_the_original_alone():
    src = _timm_model(depth=2)
    state = src.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        feats = src.forward_features(_images(32))
    big = encoder_from_state(state, img_size=48).eval()
    assert big.pos_embed.shape == (1, 1 + 36, 192) and big.config["img_size"] == [48, 48]
    with torch.no_grad():
        out = big.forward_features(_images(48))
        assert out.shape == (2, 37, 192) and torch.isfinite(out).all()
        # The source state and the model it came from are untouched; same-size "resampling" is exact.
        assert all(torch.equal(state[k], before[k]) for k in state)
        torch.testing.assert_close(src.forward_features(_images(32)), feats, rtol=0, atol=0)
        same = encoder_from_state(state, img_size=32).eval()
        torch.testing.assert_close(same.forward_features(_images(32)), feats, rtol=0, atol=0)
    # Everything but the table is carried over verbatim; the cls position is kept.
    for key, value in big.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(value, state[key]), key
    assert torch.equal(big.pos_embed[:, :1], state["pos_embed"][:, :1])


def test_sincos_table_resamples_losslessly_there_and_back():
    enc = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, **TINY).eval()
    state = enc.state_dict()
    there = resample_encoder_state(state, 64)
    back = resample_encoder_state(there, 32)
    assert there["pos_embed"].shape == (1, 1 + 64, 32)
    assert torch.equal(back["pos_embed"], state["pos_embed"])
    again = encoder_from_state(back, num_heads=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(_images(32)), enc.forward_features(_images(32)))


def test_resample_rejects_a_size_off_the_patch_grid():
    state = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, **TINY).state_dict()
    with pytest.raises(ValueError, match="img_size 50 is not a multiple of the patch size 8"):
        resample_encoder_state(state, 50)
