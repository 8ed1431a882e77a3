"""Contrastive MAE: agreement on doubly-masked positions only, hand-computed agreement values,
separate decoders and a shared encoder, overfitting a batch, build errors, the recipes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mimkit.ssl.cmae  # noqa: F401  (registers "cmae")
from mimkit.ssl import MAE, build_method
from mimkit.ssl.cmae import (
    AGREEMENTS,
    ContrastiveMAE,
    all_pairs_agreement,
    diagonal_agreement,
    infonce_agreement,
)
from mimkit.ssl.masking import MaskGenerator, ids_keep
from mimkit.ssl.targets import masked_mse, pixel_targets
from tests.helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "name": "cmae",
    "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2},
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _disjoint_masks(batch: int, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, L) masks hiding complementary halves: no patch is masked twice."""
    g = torch.Generator().manual_seed(0)
    mask1 = torch.zeros(batch, length, dtype=torch.bool)
    for row in mask1:
        row[torch.randperm(length, generator=g)[: length // 2]] = True
    return mask1, ~mask1


# ---------------------------------------------------------------------------------------------
# The agreement term.

# Two images, four positions, 3-D features. Doubly-masked counts differ per image (2 and 1), so
# the mean is over the 3 positions, not a mean of per-image means.
BOTH = torch.tensor([[True, False, True, False], [False, False, False, True]])


def _features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)


def test_diagonal_agreement_matches_the_paper_definition_by_hand():
    f1, f2 = _features(0)
    a, b, m = f1.tolist(), f2.tolist(), BOTH.tolist()
    terms = [1 - _cos(a[i][n], b[i][n]) for i in range(2) for n in range(4) if m[i][n]]
    expected = sum(terms) / len(terms)
    assert len(terms) == 3
    assert diagonal_agreement(f1, f2, BOTH).item() == pytest.approx(expected, abs=1e-6)


def test_all_pairs_agreement_matches_the_released_code_by_hand():
    f1, f2 = _features(1)
    a, b, m = f1.tolist(), f2.tolist(), BOTH.tolist()
    # sum_{b,i,j} M[b,i] (1 - cos(f1[b,i], f2[b,j])) / sum_{b,i,j} M[b,i]
    num = den = 0.0
    for i in range(2):
        for n in range(4):
            for k in range(4):
                num += m[i][n] * (1 - _cos(a[i][n], b[i][k]))
                den += m[i][n]
    assert den == 12
    assert all_pairs_agreement(f1, f2, BOTH).item() == pytest.approx(num / den, abs=1e-6)
    assert all_pairs_agreement(f1, f2, BOTH).item() != pytest.approx(diagonal_agreement(f1, f2, BOTH).item())


def test_infonce_agreement_matches_a_hand_computation():
    f1, f2 = _features(2)
    t = 0.5
    a, b = f1[BOTH].tolist(), f2[BOTH].tolist()  # the 3 doubly-masked (image, position) pairs
    s = [[_cos(a[r], b[c]) / t for c in range(3)] for r in range(3)]
    rows = [-s[r][r] + math.log(sum(math.exp(s[r][c]) for c in range(3))) for r in range(3)]
    cols = [-s[c][c] + math.log(sum(math.exp(s[r][c]) for r in range(3))) for c in range(3)]
    expected = (sum(rows) / 3 + sum(cols) / 3) / 2
    assert infonce_agreement(f1, f2, BOTH, temperature=t).item() == pytest.approx(expected, abs=1e-5)


def test_agreement_reads_only_doubly_masked_positions():
    f1, f2 = _features(3)
    elsewhere = ~BOTH[..., None]
    g1, g2 = f1 + 5 * elsewhere * torch.randn_like(f1), f2 + 5 * elsewhere * torch.randn_like(f2)
    for name, fn in AGREEMENTS.items():
        base = fn(f1, f2, BOTH)
        torch.testing.assert_close(fn(g1, f2, BOTH), base, msg=name)  # branch 1 only at M
        if name != "all_pairs":  # the released code compares with every branch-2 token
            torch.testing.assert_close(fn(f1, g2, BOTH), base, msg=name)
    assert all_pairs_agreement(f1, g2, BOTH) != all_pairs_agreement(f1, f2, BOTH)


@pytest.mark.parametrize("agreement", list(AGREEMENTS))
def test_masks_sharing_no_patch_give_zero_agreement_and_no_gradient(agreement):
    torch.manual_seed(0)
    model = build_method({**TINY, "agreement": agreement})
    mask1, mask2 = _disjoint_masks(3)
    out = model({"image": torch.randn(3, 3, 32, 32)}, mask=(mask1, mask2))
    assert out["co_masked"].item() == 0.0
    assert out["loss_agree"].item() == 0.0
    assert out["loss"].item() == pytest.approx((out["loss_rec1"] + out["loss_rec2"]).item())
    if out["loss_agree"].requires_grad:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out["loss_agree"], params, allow_unused=True)
        assert all(g is None or not g.any() for g in grads)
    # the same model with overlapping masks does produce an agreement gradient
    out = model({"image": torch.randn(3, 3, 32, 32)}, mask=(mask1, mask1))
    assert out["loss_agree"].item() > 0
    out["loss_agree"].backward()
    assert model.decoder1.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The model.


def test_outputs_and_the_logged_co_masked_fraction():
    torch.manual_seed(0)
    model = build_method(TINY)
    assert isinstance(model, ContrastiveMAE)
    out = model({"image": torch.randn(256, 3, 32, 32)})
    for key in ("loss", "loss_rec1", "loss_rec2", "loss_agree", "co_masked"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    m1, m2 = out["patch_mask"], out["patch_mask2"]
    assert (m1.sum(1) == 12).all() and (m2.sum(1) == 12).all() and not torch.equal(m1, m2)
    assert out["co_masked"].item() == (m1 & m2).float().mean().item()
    # independent draws of 12 of 16 masked: expected co-masked fraction 0.75^2 = 0.5625
    assert out["co_masked"].item() == pytest.approx(0.5625, abs=0.03)
    assert out["pred"].shape == out["pred2"].shape == (256, 16, 8 * 8 * 3)
    expected = out["loss_rec1"] + out["loss_rec2"] + model.agreement_weight * out["loss_agree"]
    torch.testing.assert_close(out["loss"], expected)


def test_a_single_mask_fixes_branch_1_so_reconstructions_can_be_drawn():
    from mimkit.visualize import RECON_ROWS, reconstruct

    torch.manual_seed(0)
    model = build_method(TINY).eval()
    mask = model.mask_generator(2, model.encoder.grid_size, generator=torch.Generator().manual_seed(0))
    out = model({"image": torch.randn(2, 3, 32, 32)}, mask=mask)
    assert torch.equal(out["patch_mask"], mask) and (out["patch_mask2"].sum(1) == 12).all()
    pictures = reconstruct(model, torch.randn(2, 3, 32, 32), torch.zeros(3), torch.ones(3))
    assert set(pictures) == set(RECON_ROWS)


def test_batched_encoder_pass_equals_one_mae_pass_per_branch():
    torch.manual_seed(0)
    model = build_method(TINY).eval()
    images = torch.randn(3, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    masks = [model.mask_generator(3, model.encoder.grid_size, generator=g) for _ in range(2)]
    out = model({"image": images}, mask=torch.stack(masks))
    target = pixel_targets(images, 8)
    feats = []
    for mask, decoder, key in zip(masks, (model.decoder1, model.decoder2), ("loss_rec1", "loss_rec2")):
        keep = ids_keep(mask)
        feats.append(decoder.forward_features(model.encoder.forward_visible(images, keep), keep))
        expected = masked_mse(decoder.head(feats[-1]), target, mask)
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)
    expected = diagonal_agreement(feats[0][:, 1:], feats[1][:, 1:], masks[0] & masks[1])
    torch.testing.assert_close(out["loss_agree"], expected, rtol=1e-5, atol=1e-6)


def test_decoders_are_separate_and_the_encoder_learns_from_both_branches():
    torch.manual_seed(0)
    model = build_method(TINY)
    d1, d2 = dict(model.decoder1.named_parameters()), dict(model.decoder2.named_parameters())
    assert {k: v.shape for k, v in d1.items()} == {k: v.shape for k, v in d2.items()}
    assert not {p.data_ptr() for p in d1.values()} & {p.data_ptr() for p in d2.values()}
    d1 = {k: p for k, p in d1.items() if p.requires_grad}  # the sin-cos tables are frozen
    d2 = {k: p for k, p in d2.items() if p.requires_grad}
    assert not torch.equal(model.decoder1.mask_token, model.decoder2.mask_token)

    out = model({"image": torch.randn(2, 3, 32, 32)})
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    names = ("decoder1", "decoder2")
    by_branch = {}
    for key, own in (("loss_rec1", 0), ("loss_rec2", 1)):  # each branch's loss alone
        params = encoder + list(d1.values()) + list(d2.values())
        grads = torch.autograd.grad(out[key], params, retain_graph=True, allow_unused=True)
        enc, dec1, dec2 = grads[: len(encoder)], grads[len(encoder) : -len(d2)], grads[-len(d2) :]
        assert sum(g.abs().sum() for g in enc) > 0, f"encoder gets no gradient from {key}"
        own_grads, other_grads = (dec1, dec2) if own == 0 else (dec2, dec1)
        assert any(g is not None and g.any() for g in own_grads), f"{names[own]} untouched by {key}"
        assert all(g is None or not g.any() for g in other_grads), f"{key} reaches the other decoder"
        by_branch[key] = torch.cat([g.flatten() for g in enc])
    assert not torch.allclose(by_branch["loss_rec1"], by_branch["loss_rec2"])
    # the agreement is not stop-gradiented: it reaches both decoders
    fc2 = [d["blocks.0.mlp.fc2.weight"] for d in (d1, d2)]
    grads = torch.autograd.grad(out["loss_agree"], fc2)
    assert all(g.abs().sum() > 0 for g in grads)


def test_parameters_are_mae_plus_one_more_decoder():
    mae_cfg = {**TINY, "name": "mae"}
    mae, cmae = build_method(mae_cfg), build_method(TINY)
    assert isinstance(mae, MAE)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(cmae) == count(mae) + count(mae.decoder)
    assert 0.01 < cmae.decoder2.mask_token.std() < 0.03  # MAE's initialisation for both decoders
    assert torch.all(cmae.decoder2.embed.bias == 0)


def test_set_epoch_reaches_the_mask_generator():
    class Recording(MaskGenerator):
        epochs: list[int] = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    encoder = build_method(TINY).encoder
    model = ContrastiveMAE(encoder, Recording(0.75), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    model.set_epoch(3)
    assert model.mask_generator.epochs == [3]


@pytest.mark.parametrize("agreement", list(AGREEMENTS))
def test_tiny_cmae_overfits_one_fixed_batch(agreement):
    torch.manual_seed(0)
    model = build_method({**TINY, "norm_pix_loss": False, "agreement": agreement, "temperature": 0.5})
    images = torch.randn(4, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    masks = tuple(model.mask_generator(4, model.encoder.grid_size, generator=g) for _ in range(2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(200):
        out = model({"image": images}, mask=masks)
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        first = first or {k: out[k].item() for k in ("loss", "loss_rec1", "loss_rec2", "loss_agree")}
    for key in ("loss", "loss_rec1", "loss_rec2"):
        assert out[key].item() < 0.6 * first[key], key
    assert out["loss_agree"].item() < first["loss_agree"]


def test_build_errors_name_the_bad_value_and_the_valid_ones():
    with pytest.raises(
        ValueError, match="agreement must be one of 'diagonal', 'all_pairs', 'infonce', got 'cosine'"
    ):
        build_method({**TINY, "agreement": "cosine"})
    with pytest.raises(ValueError, match="temperature.*0"):
        build_method({**TINY, "temperature": 0.0})
    with pytest.raises(ValueError, match="agreement_weight.*-1"):
        build_method({**TINY, "agreement_weight": -1.0})
    with pytest.raises(ValueError, match="agreement_wieght.*agreement_weight"):
        build_method({**TINY, "agreement_wieght": 1.0})
    model = build_method(TINY)
    with pytest.raises(ValueError, match="pair of masks, got 3"):
        model({"image": torch.randn(2, 3, 32, 32)}, mask=torch.ones(3, 2, 16, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Recipes and the pretraining tool.


def test_recipes_load_and_build():
    from mimkit.train import load_recipe

    base = load_recipe(REPO / "recipes/cmae/vit_base_patch16_in1k.yaml", check_data=False)
    mae = load_recipe(REPO / "recipes/mae/vit_base_patch16_in1k.yaml", check_data=False)
    assert base.method.name == "cmae" and base.method.backbone["name"] == "vit_base_patch16"
    assert base.method.options["agreement"] == "diagonal" and base.method.mask["ratio"] == 0.75
    assert base.optim == mae.optim and base.batch == mae.batch and base.train == mae.train
    demo = load_recipe(REPO / "recipes/demo/cmae_vit_tiny.yaml")
    assert demo.method.name == "cmae" and demo.train.precision == "fp32"


def test_demo_recipe_trains_through_the_pretrain_tool(tmp_path):
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        "method.backbone.img_size=32",
        "method.backbone.depth=1",
        "method.decoder_dim=32",
        "method.decoder_depth=1",
        "method.decoder_heads=2",
        "data.source=synthetic:shapes?size=32&train=16&val=8",
        "batch.global_size=4",
        "batch.micro_size=4",
        "train.max_steps=3",
        "run.log_every=1",
        "run.progress=false",
        "run.monitor=null",  # the demo's k-NN monitor and pictures are tested on their own
        "run.images_every=0",
    ]
    # `python tools/pretrain.py RECIPE ...`, with "cmae" registered first in case mimkit.ssl does not
    # import it yet
    run_tool = (
        "import runpy, sys, mimkit.ssl.cmae; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    tool, recipe = REPO / "tools/pretrain.py", REPO / "recipes/demo/cmae_vit_tiny.yaml"
    cmd = [sys.executable, "-c", run_tool, str(tool), str(recipe)]
    env = subprocess_env()
    proc = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert {"loss", "loss_rec1", "loss_rec2", "loss_agree", "co_masked"} <= set(line)
        total = line["loss_rec1"] + line["loss_rec2"] + line["loss_agree"]  # agreement_weight 1
        assert line["loss"] == pytest.approx(total, rel=1e-4)
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
