"""Backbone registry: timm interop, visible-token forward, sin-cos table, export round trip."""

import math

import pytest
import timm
import torch

from mimkit.models import create_backbone, list_backbones, load_backbone, save_backbone, sincos_2d

TINY = {"img_size": 32, "patch_size": 8, "depth": 2}


def test_registry_lists_the_paper_backbones():
    assert {
        "vit_tiny_patch16",
        "vit_small_patch16",
        "vit_base_patch16",
        "vit_large_patch16",
        "vit_huge_patch14",
    } <= set(list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_builds_and_runs_tiny(name):
    model = create_backbone(name, img_size=28, patch_size=14, depth=1)
    out = model.forward_features(torch.randn(2, 3, 28, 28))
    assert out.shape == (2, 1 + 4, model.embed_dim)


def test_unknown_backbone_names_the_valid_ones():
    with pytest.raises(ValueError, match="vit_gigantic.*vit_base_patch16"):
        create_backbone("vit_gigantic")


def test_unknown_override_and_pos_embed_are_errors():
    with pytest.raises(ValueError, match="unknown key colour for backbone 'vit_tiny_patch16'; valid: img"):
        create_backbone("vit_tiny_patch16", colour="red")
    with pytest.raises(ValueError, match="pos_embed must be one of 'sincos', 'learn', got 'rope'"):
        create_backbone("vit_tiny_patch16", pos_embed="rope")


@pytest.mark.parametrize(
    "name,timm_name",
    [("vit_tiny_patch16", "vit_tiny_patch16_224"), ("vit_small_patch16", "vit_small_patch16_224")],
)
def test_state_dict_loads_strictly_into_timm_and_back(name, timm_name):
    ours = create_backbone(name, **TINY).eval()
    theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, **TINY).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        theirs.forward_features(images), ours.forward_features(images), atol=1e-5, rtol=1e-5
    )

    # and the other way round, from a randomly initialised timm model
    theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, **TINY).eval()
    ours = create_backbone(name, pos_embed="learn", **TINY).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(
        ours.forward_features(images), theirs.forward_features(images), atol=1e-5, rtol=1e-5
    )


def test_visible_forward_equals_encoder_on_hand_selected_tokens():
    model = create_backbone("vit_tiny_patch16", **TINY).eval()
    images = torch.randn(3, 3, 32, 32)
    keep = torch.stack([torch.randperm(16)[:5] for _ in range(3)])
    out = model.forward_visible(images, keep)

    tokens = model.patch_embed(images) + model.pos_embed[:, 1:]
    for b in range(3):
        seq = torch.cat([model.cls_token[0] + model.pos_embed[0, :1], tokens[b, keep[b]]])[None]
        expected = model.norm(model.blocks(seq))
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_visible_forward_with_all_tokens_equals_forward_features():
    model = create_backbone("vit_tiny_patch16", **TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    keep = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(
        model.forward_visible(images, keep), model.forward_features(images), atol=1e-5, rtol=1e-5
    )


def test_sincos_table_matches_mae_formula_in_mae_layout():
    dim, rows, cols = 16, 3, 5
    table = sincos_2d(dim, (rows, cols))
    assert table.shape == (1 + rows * cols, dim)
    assert torch.all(table[0] == 0)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            row = table[1 + r * cols + c]
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                # MAE: column coordinate in the first half, row in the second
                expected = [
                    math.sin(c * omega),
                    math.cos(c * omega),
                    math.sin(r * omega),
                    math.cos(r * omega),
                ]
                got = [row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k]]
                for e, g in zip(expected, got):
                    assert abs(float(g) - e) < 1e-6


def test_sincos_pos_embed_is_frozen_and_learnable_is_trainable():
    fixed = create_backbone("vit_tiny_patch16", **TINY)
    assert not fixed.pos_embed.requires_grad
    torch.testing.assert_close(fixed.pos_embed[0], sincos_2d(192, (4, 4)))
    learned = create_backbone("vit_tiny_patch16", pos_embed="learn", **TINY)
    assert learned.pos_embed.requires_grad


def test_export_round_trip_without_naming_the_architecture(tmp_path):
    model = create_backbone("vit_small_patch16", img_size=48, patch_size=16, depth=3, in_chans=1).eval()
    save_backbone(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.json", "encoder.safetensors"]
    loaded = load_backbone(tmp_path).eval()
    assert loaded.config == model.config
    images = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(loaded.forward_features(images), model.forward_features(images))
    loaded_from_file = load_backbone(tmp_path / "encoder.safetensors")
    assert len(loaded_from_file.blocks) == 3


def test_load_backbone_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        load_backbone(tmp_path)


def test_public_steps_compose_into_timm_forward():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=3, drop_path_rate=0.2).eval()
    assert vit.drop_path_rate == 0.2 and vit.config["drop_path_rate"] == 0.2
    images = torch.randn(2, 3, 32, 32)
    x, taps = vit.run_blocks(vit.with_prefix(vit.patch_tokens(images)), taps=(0, 2))
    torch.testing.assert_close(vit.norm(x), vit.forward_features(images))
    first = vit.forward_intermediates(
        images, indices=[0], norm=False, intermediates_only=True, output_fmt="NLC"
    )
    torch.testing.assert_close(taps[0][:, 1:], first[0])
    seen = []

    def doubled(i, block, h):  # replaces block 1, leaves the others to run as they are
        seen.append(i)
        return h + 2 * (block(h) - h) if i == 1 else None

    y, _ = vit.run_blocks(vit.with_prefix(vit.patch_tokens(images)), doubled)
    assert seen == [0, 1, 2] and not torch.allclose(x, y)
    tokens = vit.patch_tokens(images)  # a sequence without the cls token takes the same steps
    torch.testing.assert_close(vit.ready_for_blocks(tokens), vit.with_prefix(tokens)[:, 1:])
