"""MAE: patchify layout, masked-only loss, norm-pix target, overfitting a batch, build errors."""

import pytest
import torch

from mimkit.ssl import MAE, build_method
from mimkit.ssl.targets import masked_mse, patchify, pixel_targets, unpatchify

TINY = {
    "name": "mae",
    "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2},
    "decoder_dim": 64,
    "decoder_depth": 2,
    "decoder_heads": 4,
}


def test_patchify_unpatchify_round_trip_and_layout():
    images = torch.randn(2, 3, 24, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 12, 192)
    torch.testing.assert_close(unpatchify(patches, 8, (3, 4)), images, rtol=0, atol=0)
    # patch (row 1, col 2), pixel (row 3, col 5), channel 1 sits at (3 * 8 + 5) * 3 + 1
    assert patches[0, 1 * 4 + 2, (3 * 8 + 5) * 3 + 1] == images[0, 1, 8 + 3, 16 + 5]


def test_norm_pix_target_standardises_each_patch():
    images = torch.randn(2, 3, 16, 16) * 5 + 2
    target = pixel_targets(images, 8, norm_pix=True)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixel_targets(images, 8, norm_pix=False), patchify(images, 8))


def test_loss_ignores_visible_patches_and_counts_masked_ones():
    pred, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    loss = masked_mse(pred, target, mask)
    changed = target.clone()
    changed[~mask] += 100.0
    assert masked_mse(pred, changed, mask) == loss
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)
    changed[mask] += 1.0
    assert masked_mse(pred, changed, mask) != loss


def test_forward_returns_loss_and_equal_count_mask():
    model = build_method(TINY)
    assert isinstance(model, MAE)
    out = model({"image": torch.randn(3, 3, 32, 32)})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["pred"].shape == (3, 16, 8 * 8 * 3)
    assert (out["patch_mask"].sum(1) == 12).all()


def test_visible_pixels_do_not_change_the_loss_for_a_given_mask():
    model = build_method({**TINY, "norm_pix_loss": False}).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 4:] = True
    out = model({"image": images}, mask=mask)
    # the prediction depends on the visible pixels, so hold it fixed and vary only the targets
    target = pixel_targets(images, 8, norm_pix=False)
    target_changed = target.clone()
    target_changed[:, :4] = 7.0
    assert masked_mse(out["pred"], target_changed, mask) == masked_mse(out["pred"], target, mask)


def test_official_initialisation():
    model = build_method({**TINY, "backbone": {**TINY["backbone"], "depth": 1}})
    assert torch.all(model.decoder.embed.bias == 0)
    qkv = model.encoder.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert 0.01 < model.decoder.mask_token.std() < 0.03
    assert not model.decoder.pos_embed.requires_grad


def test_tiny_mae_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = build_method({**TINY, "norm_pix_loss": False})
    images = torch.randn(4, 3, 32, 32)
    mask = model.mask_generator(4, model.encoder.grid_size, generator=torch.Generator().manual_seed(0))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(200):
        loss = model({"image": images}, mask=mask)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_build_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="mea.*mae"):
        build_method({**TINY, "name": "mea"})
    with pytest.raises(ValueError, match="decoder_width.*decoder_dim"):
        build_method({**TINY, "decoder_width": 3})
    with pytest.raises(ValueError, match="ratio"):
        build_method({**TINY, "mask": {"type": "random", "ratio": 1.2}})
    with pytest.raises(ValueError, match="vit_mega"):
        build_method({**TINY, "backbone": {"name": "vit_mega"}})


def test_vit_base_mae_has_the_published_parameter_count():
    # mmpretrain's model zoo lists MAE ViT-B/16 (encoder + dec512d8b) at 111.91 M parameters,
    # counting the frozen sin-cos tables.
    model = build_method({"name": "mae", "backbone": {"name": "vit_base_patch16"}})
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 111.91
