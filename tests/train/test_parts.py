"""The trainer's parts on their own: lr schedule, parameter groups, data order, checkpoint pruning."""

import math

import pytest
import torch

from mimkit.train.checkpoint import LATEST, latest_tag, prune, tag_for
from mimkit.train.loader import ResumableShardSampler, SeededSamples
from mimkit.train.optim import param_groups
from mimkit.train.schedule import warmup_cosine_lr


def test_schedule_matches_mae_lr_sched():
    # 10 steps per epoch, 2 warm-up epochs of 10: lr * epoch / warmup, then half-cycle cosine.
    kw = dict(steps_per_epoch=10, lr=1.0, epochs=10, warmup_epochs=2, min_lr=0.1)
    assert warmup_cosine_lr(0, **kw) == 0.0
    assert warmup_cosine_lr(5, **kw) == pytest.approx(0.25)  # epoch 0.5
    assert warmup_cosine_lr(20, **kw) == pytest.approx(1.0)  # end of warm-up
    assert warmup_cosine_lr(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert warmup_cosine_lr(99, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7.9 / 8)))
    assert warmup_cosine_lr(100, **kw) == pytest.approx(0.1)


def test_param_groups_follow_mae():
    from mimkit.ssl import build_method

    method = build_method(
        {
            "name": "mae",
            "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 1},
            "decoder_dim": 32,
            "decoder_depth": 1,
            "decoder_heads": 2,
        }
    )
    groups = param_groups(method, weight_decay=0.05, no_decay=["pos_embed", "_token"])
    names = {id(p): n for n, p in method.named_parameters()}
    skip = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.05
    assert "encoder.cls_token" in skip and any(n.endswith("mask_token") for n in skip)
    assert all(n.endswith(("bias", "weight", "_token", "pos_embed")) for n in skip)
    assert all(p.ndim >= 2 for n, p in method.named_parameters() if n in decay)
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.blocks.0.norm1.weight" in skip
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert "encoder.pos_embed" in frozen and not frozen & (skip | decay)
    assert skip | decay | frozen == set(names.values())


def _order(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [i for i, _ in sampler]


def test_sampler_shards_whole_global_batches_and_resumes_exactly():
    length, global_batch, world = 50, 8, 2
    ranks = [ResumableShardSampler(length, global_batch, r, world, seed=3) for r in range(world)]
    assert ranks[0].steps_per_epoch == 6 and len(ranks[0]) == 24
    shares = [_order(s, epoch=1) for s in ranks]
    assert not set(shares[0]) & set(shares[1])
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    for step in range(6):  # each optimizer step consumes one slice of the epoch's permutation
        seen = shares[0][step * 4 : step * 4 + 4] + shares[1][step * 4 : step * 4 + 4]
        assert sorted(seen) == sorted(perm[step * 8 : step * 8 + 8])
    for s, full in zip(ranks, shares):
        assert _order(s, epoch=1, start=2) == full[8:]
        s.set_epoch(1, 2)
        assert len(s) == 16
    assert _order(ranks[0], epoch=2) != shares[0]


def test_sample_augmentation_depends_on_seed_only():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    data = SeededSamples(Noise())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = data[(1, 123)], data[(1, 123)]
    assert torch.equal(a, b) and not torch.equal(a, data[(1, 124)])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream (masks) is untouched


def test_prune_keeps_newest_complete_and_drops_unfinished(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / tag_for(step)).mkdir()
    (tmp_path / LATEST).write_text(tag_for(6))
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for(4), tag_for(6)]
    assert latest_tag(tmp_path) == tag_for(6)
