"""MixedAE: the mixing partition and targets, homologous attention, the homologous contrastive loss
by hand, a plain exported encoder, overfitting a batch, build errors, the recipes and the tool."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention

import mimkit.ssl.mixedae  # noqa: F401  (registers "mixedae")
from mimkit.models import load_backbone, save_backbone
from mimkit.ssl import build_method
from mimkit.ssl.mixedae import (
    MixedAE,
    homologous_attention,
    homologous_contrastive_loss,
    image_masks,
    mix,
    owner_from_mask,
    split_positions,
    topk_keep,
)
from mimkit.ssl.targets import masked_mse, patchify, pixel_targets, unpatchify
from tests.helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "name": "mixedae",
    "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2},
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def _images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Mixing: the partition, the mixed sequence, the targets.


@pytest.mark.parametrize("size, n", [(4, 16), (2, 16), (4, 196)])
def test_each_position_has_one_owner_and_each_image_owns_r_n(size, n):
    owner = split_positions(5, n, size, generator=torch.Generator().manual_seed(0))
    assert owner.shape == (5, n) and owner.min() >= 0 and owner.max() < size
    counts = torch.stack([(owner == s).sum(1) for s in range(size)], dim=1)
    assert (counts == n // size).all()
    masks = image_masks(owner, size).view(5, size, n)
    assert ((~masks).sum(1) == 1).all()  # every position visible to exactly one image of its group
    assert not torch.equal(owner[0], owner[1])  # a fresh split per group


def test_mixed_sequence_takes_each_position_from_its_owner():
    size, n = 4, 16
    tokens = torch.randn(8, n, 5)
    owner = split_positions(2, n, size, generator=torch.Generator().manual_seed(1))
    mixed = mix(tokens, owner)
    for g in range(2):
        for j in range(n):
            src = g * size + owner[g, j].item()
            torch.testing.assert_close(mixed[g, j], tokens[src, j])
            others = [tokens[g * size + s, j] for s in range(size) if s != owner[g, j]]
            assert all(not torch.equal(mixed[g, j], o) for o in others)


def test_each_image_is_reconstructed_on_exactly_its_unowned_patches():
    torch.manual_seed(0)
    model = build_method({**TINY, "norm_pix_loss": False})
    images = _images()
    out = model({"image": images})
    owner, mask = out["owner"], out["patch_mask"]
    for b in range(8):
        g, s = divmod(b, 4)
        assert torch.equal(mask[b], owner[g] != s)
        assert mask[b].sum() == 12  # (1 - r) N hidden patches
    # The loss is the mean of per-image MSEs over exactly those positions (equal counts).
    target = pixel_targets(images, 8, norm_pix=False)
    per_image = [masked_mse(out["pred"][b : b + 1], target[b : b + 1], mask[b : b + 1]) for b in range(8)]
    torch.testing.assert_close(out["loss_rec"], torch.stack(per_image).mean())
    # Image 1's hidden patches are its targets and nothing else: changing them leaves every
    # prediction unchanged (the encoder never sees them) and changes the loss.
    patches = patchify(images, 8)
    patches[1, mask[1]] = torch.randn(int(mask[1].sum()), 192)
    moved = model({"image": unpatchify(patches, 8, (4, 4))}, mask=mask)
    torch.testing.assert_close(moved["pred"], out["pred"])
    assert moved["loss_rec"].item() != pytest.approx(out["loss_rec"].item())


def test_a_given_mask_fixes_the_split_and_bad_masks_are_refused():
    torch.manual_seed(0)
    model = build_method(TINY)
    owner = split_positions(2, 16, 4, generator=torch.Generator().manual_seed(3))
    mask = image_masks(owner, 4)
    out = model({"image": _images()}, mask=mask)
    assert torch.equal(out["owner"], owner) and torch.equal(owner_from_mask(mask, 4), owner)
    bad = mask.clone()
    bad[0, (~bad[0]).nonzero()[0]] = True  # a position now owned by nobody
    with pytest.raises(ValueError, match="partition each group's 16 positions among its 4 images, 4 each"):
        model({"image": _images()}, mask=bad)


def test_the_methods_mask_generator_draws_valid_splits_for_tools():
    from mimkit.visualize import reconstruct

    torch.manual_seed(0)
    model = build_method(TINY).eval()
    g = torch.Generator().manual_seed(0)
    mask = model.mask_generator(8, model.encoder.grid_size, generator=g)
    owner = owner_from_mask(mask, 4)  # raises unless a partition with 4 positions per image
    assert torch.equal(image_masks(owner, 4), mask)
    pictures = reconstruct(model, _images(), torch.zeros(3), torch.ones(3), seed=0)
    assert pictures["reconstruction"].shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="6 images do not split into groups of 4"):
        model.mask_generator(6, model.encoder.grid_size)


def test_batch_not_divisible_by_the_group_size_is_a_clear_error():
    model = build_method(TINY)
    with pytest.raises(ValueError, match="batch of 6 images.*groups of 4.*multiple of 4"):
        model({"image": _images(6)})


# ---------------------------------------------------------------------------------------------
# Homologous attention.


def _attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(16, num_heads=2, qkv_bias=True).eval()


def test_topk_keeps_exactly_k_patch_keys_plus_cls_and_cls_attends_globally():
    logits = torch.randn(3, 2, 17, 17)
    keep = topk_keep(logits, 5)
    assert (keep[..., 1:, 1:].sum(-1) == 5).all()
    assert keep[..., 1:, 0].all() and keep[..., 0, :].all()
    # the kept patch keys are the largest logits of each row
    kept_min = logits[..., 1:, 1:].masked_fill(~keep[..., 1:, 1:], math.inf).amin(-1)
    dropped_max = logits[..., 1:, 1:].masked_fill(keep[..., 1:, 1:], -math.inf).amax(-1)
    assert (kept_min > dropped_max).all()


def test_homologous_attention_with_k_equal_n_is_ordinary_attention():
    attn = _attention()
    x = torch.randn(2, 17, 16)
    torch.testing.assert_close(homologous_attention(attn, x, k=16), attn(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(homologous_attention(attn, x, k=4), attn(x), atol=1e-3)


def test_homologous_attention_matches_masking_logits_by_hand():
    attn = _attention(1)
    x = torch.randn(1, 9, 16)
    k = 3
    q, key, v = attn.qkv(x).reshape(1, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = q @ key.transpose(-2, -1) * 8**-0.5
    masked = logits.clone()
    for h in range(2):
        for i in range(1, 9):
            cut = logits[0, h, i, 1:].sort(descending=True).values[k - 1]
            masked[0, h, i, 1:][logits[0, h, i, 1:] < cut] = -math.inf
    expected = attn.proj((masked.softmax(-1) @ v).transpose(1, 2).reshape(1, 9, 16))
    torch.testing.assert_close(homologous_attention(attn, x, k), expected, atol=1e-5, rtol=1e-5)


def test_homologous_precision_counts_kept_keys_from_the_query_image():
    attn = _attention(2)
    owner = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0]])
    # Tokens of each image are identical, so each query's logits are highest on its own image.
    base = torch.randn(2, 16) * 3
    x = torch.cat([torch.randn(1, 1, 16), base[owner]], dim=1)
    stats = []
    homologous_attention(attn, x, k=4, owner=owner, stats=stats)
    logits_keep = []
    qkv = attn.qkv(x).reshape(1, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    keep = topk_keep(qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale, 4)[..., 1:, 1:]
    same = owner[0][:, None] == owner[0][None, :]
    for h in range(2):
        for i in range(8):
            logits_keep.append(same[i][keep[0, h, i]].float().mean())
    assert len(stats) == 1
    assert stats[0].item() == pytest.approx(torch.stack(logits_keep).mean().item())


def test_homologous_attention_is_used_in_training_only_and_adds_no_parameter(tmp_path):
    torch.manual_seed(0)
    model = build_method(TINY)
    images = _images()
    mask = image_masks(split_positions(2, 16, 4, generator=torch.Generator().manual_seed(0)), 4)
    out = model({"image": images}, mask=mask)
    assert 0.0 <= out["homo_precision"].item() <= 1.0
    model.eval()
    with torch.no_grad():
        plain = model({"image": images}, mask=mask)
        model.train()
        model.topk = 16  # k = N: homologous attention is ordinary attention
        same = model({"image": images}, mask=mask)
    assert "homo_precision" not in plain
    hidden = same["patch_mask"]  # training mode predicts the hidden patches only
    torch.testing.assert_close(same["pred"][hidden], plain["pred"][hidden], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same["loss_rec"], plain["loss_rec"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same["loss_homo"], plain["loss_homo"], atol=1e-5, rtol=1e-5)

    # The exported encoder is a plain ViT: same keys and count as a fresh backbone, loads strictly.
    fresh = build_method({**TINY, "name": "mae"}).encoder
    assert set(model.encoder.state_dict()) == set(fresh.state_dict())
    save_backbone(model.encoder, tmp_path)
    reloaded = load_backbone(tmp_path)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2
    )
    vit.load_state_dict(reloaded.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.eval().forward_features(x), model.encoder.eval().forward_features(x))


def test_homologous_blocks_and_naive_mixing(monkeypatch):
    torch.manual_seed(0)
    one = build_method({**TINY, "homologous_blocks": [1]})
    naive = build_method({**TINY, "mixing": "naive"})
    seen = []
    orig = mimkit.ssl.mixedae.homologous_block_forward

    def spy(block, *args):
        seen.append(block)
        return orig(block, *args)

    monkeypatch.setattr(mimkit.ssl.mixedae, "homologous_block_forward", spy)
    one({"image": _images()})
    out = naive({"image": _images()})
    assert seen == [one.encoder.blocks[1]]  # only block 1, and none in naive mode
    assert out["loss_homo"].item() == 0.0 and "homo_precision" not in out
    assert out["loss"].item() == pytest.approx(out["loss_rec"].item())


# ---------------------------------------------------------------------------------------------
# The homologous contrastive loss.


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def test_contrastive_loss_matches_a_hand_computation():
    feats = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    owner = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    t = 0.5
    terms = []
    for g in range(2):
        f, o = feats[g].tolist(), owner[g].tolist()
        for i in range(4):
            denom = sum(math.exp(_cos(f[i], f[a]) / t) for a in range(4) if a != i)
            pos = [p for p in range(4) if p != i and o[p] == o[i]]
            terms.append(-sum(math.log(math.exp(_cos(f[i], f[p]) / t) / denom) for p in pos) / len(pos))
    expected = sum(terms) / len(terms)
    got = homologous_contrastive_loss(feats, owner, temperature=t).item()
    assert got == pytest.approx(expected, abs=1e-5)


def test_contrastive_loss_is_lower_when_features_cluster_by_source():
    g = torch.Generator().manual_seed(0)
    owner = split_positions(3, 16, 4, generator=g)
    centres = torch.randn(3, 4, 8, generator=g) * 3
    clustered = centres.gather(1, owner[..., None].expand(-1, -1, 8)) + 0.3 * torch.randn(
        3, 16, 8, generator=g
    )
    scattered = torch.randn(3, 16, 8, generator=g)
    assert homologous_contrastive_loss(clustered, owner) < homologous_contrastive_loss(scattered, owner) - 1


# ---------------------------------------------------------------------------------------------
# Training and building.


def test_tiny_mixedae_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = build_method({**TINY, "norm_pix_loss": False, "contrast_proj_dim": 16})
    images = _images()
    mask = image_masks(split_positions(2, 16, 4, generator=torch.Generator().manual_seed(0)), 4)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = model({"image": images}, mask=mask)
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        first = first or {k: out[k].item() for k in ("loss", "loss_rec", "loss_homo")}
    assert out["loss_rec"].item() < 0.6 * first["loss_rec"]
    # SupCon's floor with 3 positives among 15 others is log 3 (perfectly separated sources)
    assert out["loss_homo"].item() < 1.2 * math.log(3) < 0.5 * first["loss_homo"]
    assert out["loss"].item() < 0.7 * first["loss"]


def test_segment_embeddings_reach_the_chosen_input():
    torch.manual_seed(0)
    images = _images()
    mask = image_masks(split_positions(2, 16, 4, generator=torch.Generator().manual_seed(0)), 4)
    for place in ("decoder", "encoder"):
        model = build_method({**TINY, "segment_embed": place}).eval()
        out = model({"image": images}, mask=mask)
        out["loss"].backward()
        assert model.segment_embed.shape == (4, 192) and model.segment_embed.grad.abs().sum() > 0
        with torch.no_grad():
            feats_before = model._encode(images, owner_from_mask(mask, 4), [])[0]
            model.segment_embed.add_(1.0)
            feats_after = model._encode(images, owner_from_mask(mask, 4), [])[0]
        assert torch.equal(feats_before, feats_after) == (place == "decoder")
    assert build_method({**TINY, "segment_embed": "none"}).segment_embed is None


def test_build_errors_name_the_bad_value_and_the_valid_ones():
    with pytest.raises(ValueError, match="mix_ratio.*0.3"):
        build_method({**TINY, "mix_ratio": 0.3})
    with pytest.raises(ValueError, match="mask ratio 0.75 must equal 1 - mix_ratio = 0.5"):
        build_method({**TINY, "mix_ratio": 0.5})
    with pytest.raises(ValueError, match="mixing must be one of 'homologous', 'naive', got 'mixup'"):
        build_method({**TINY, "mixing": "mixup"})
    with pytest.raises(
        ValueError, match="segment_embed must be one of 'decoder', 'encoder', 'both', 'none', got"
    ):
        build_method({**TINY, "segment_embed": "input"})
    with pytest.raises(ValueError, match=r"homologous_blocks.*\[-2, 2\).*\[5\]"):
        build_method({**TINY, "homologous_blocks": [5]})
    with pytest.raises(
        ValueError, match=r"homologous_blocks must be one of 'all' or a list of integers, got 'many'"
    ):
        build_method({**TINY, "homologous_blocks": "many"})
    with pytest.raises(ValueError, match=r"topk must be null or an integer, got 'many'"):
        build_method({**TINY, "topk": "many"})
    with pytest.raises(ValueError, match=r"topk.*\[1, 16\].*17"):
        build_method({**TINY, "topk": 17})
    with pytest.raises(ValueError, match="contrast_temperature.*0"):
        build_method({**TINY, "contrast_temperature": 0.0})
    with pytest.raises(ValueError, match="16 patches do not split evenly among 32"):
        build_method({**TINY, "mix_ratio": 1 / 32, "mask": {"type": "random", "ratio": 31 / 32}})


# ---------------------------------------------------------------------------------------------
# Recipes and the pretraining tool.


def test_recipes_load_and_build():
    from mimkit.train import load_recipe

    base = load_recipe(REPO / "recipes/mixedae/vit_base_patch16_in1k.yaml", check_data=False)
    mae = load_recipe(REPO / "recipes/mae/vit_base_patch16_in1k.yaml", check_data=False)
    assert base.method.name == "mixedae" and base.method.backbone["name"] == "vit_base_patch16"
    assert base.method.options["mix_ratio"] == 0.25 and base.train.epochs == 800
    assert base.optim == mae.optim and base.batch == mae.batch and base.train == mae.train
    assert base.batch.micro_size % 4 == 0
    demo = load_recipe(REPO / "recipes/demo/mixedae_vit_tiny.yaml")
    assert demo.method.name == "mixedae" and demo.train.precision == "fp32"
    assert isinstance(build_method(demo.method.to_dict()), MixedAE)


def test_demo_recipe_trains_through_the_pretrain_tool(tmp_path):
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        "method.backbone.img_size=32",
        "method.backbone.depth=1",
        "method.decoder_dim=32",
        "method.decoder_depth=1",
        "method.decoder_heads=2",
        "data.source=synthetic:shapes?size=32&train=16&val=8",
        "batch.global_size=8",
        "batch.micro_size=8",
        "train.max_steps=3",
        "run.log_every=1",
        "run.progress=false",
        "run.monitor=null",  # the demo's k-NN monitor and pictures are tested on their own
        "run.images_every=0",
    ]
    # `python tools/pretrain.py RECIPE ...`, with "mixedae" registered first in case mimkit.ssl does
    # not import it yet
    run_tool = (
        "import runpy, sys, mimkit.ssl.mixedae; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    tool, recipe = REPO / "tools/pretrain.py", REPO / "recipes/demo/mixedae_vit_tiny.yaml"
    cmd = [sys.executable, "-c", run_tool, str(tool), str(recipe)]
    env = subprocess_env()
    proc = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert {"loss", "loss_rec", "loss_homo", "homo_precision"} <= set(line)
        assert line["loss"] == pytest.approx(line["loss_rec"] + line["loss_homo"], rel=1e-4)
        assert 0 <= line["homo_precision"] <= 1
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
    load_backbone(tmp_path / "run")  # the export is a plain backbone
