"""Linear probes: LARS and MAE's schedule by hand, separable vs shuffled features, grid selection."""

import math

import pytest
import torch

from mimkit.eval import LARS, GridProbe, MaeProbe, train_grid_probe, train_mae_probe
from mimkit.eval.linear_probe import carve_val, grid_heads, mae_lr, mae_plan, preset_settings
from mimkit.eval.probe_data import MaeRandomResizedCrop, SampleOrder
from tests.eval import separable
from tests.eval import single_thread as _single_thread

single_thread = pytest.fixture(autouse=True)(_single_thread)

# MAE's blr 0.1 assumes ImageNet: LARS moves a weight by about lr x 0.001 x |w| per step, and
# 1.28M images x 90 epochs give ~7000 steps at lr 6.4. Ten classes of 32 features x 30 epochs at
# batch 64 are 150 steps, so the tests raise the base lr to train the head in that budget.
SMALL_MAE = MaeProbe(epochs=30, effective_batch=64, batch_size=32, blr=5.0)
SMALL_GRID = GridProbe(n_last_blocks=(1, 2), epochs=5, epoch_length=0, batch_size=32)


def _grid_features(x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Two 'blocks' (a scaled copy, then x) and a 'patch mean' (x reversed), as the grid reads them."""
    return {"cls": x, "last_cls": torch.stack([0.5 * x, x], dim=1), "patch_mean": x.flip(1), "label": labels}


def test_lars_step_equals_a_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    gw, gb = torch.tensor([[0.3, 0.0], [0.0, 0.4]]), torch.tensor([0.5, -0.5])  # |gw| = 0.5

    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    q = 0.001 * 5 / 0.5  # trust ratio of the matrix; the bias has none
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0], [0.0, 0.0]]) - 0.5 * q * gw)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0, 2.0]) - 0.5 * gb)

    w_before, b_before = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    q2 = 0.001 * w_before.norm() / 0.5
    torch.testing.assert_close(w.detach(), w_before - 0.5 * (0.9 * q * gw + q2 * gw))
    torch.testing.assert_close(b.detach(), b_before - 0.5 * (0.9 * gb + gb))


def test_lars_weight_decay_reaches_matrices_only():
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.0, trust_coefficient=0.1)
    w.grad, b.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2)
    opt.step()
    g = torch.tensor([[1.5, 0.0], [0.0, 0.5]])  # grad + 0.5 w
    torch.testing.assert_close(w.detach(), torch.eye(2) - 0.1 * math.sqrt(2) / g.norm() * g)
    torch.testing.assert_close(b.detach(), torch.ones(2))


def test_mae_schedule_and_plan():
    assert mae_lr(0.0, 6.4, 10, 90) == 0.0
    assert mae_lr(5.0, 6.4, 10, 90) == pytest.approx(3.2)
    assert mae_lr(10.0, 6.4, 10, 90) == pytest.approx(6.4)
    assert mae_lr(50.0, 6.4, 10, 90) == pytest.approx(3.2)  # half-way through the cosine
    assert mae_lr(90.0, 6.4, 10, 90) == pytest.approx(0.0)

    plan = mae_plan(MaeProbe(), num_train=1_281_167)
    assert (plan["effective_batch"], plan["batch_size"], plan["accum_steps"]) == (16384, 512, 32)
    assert plan["lr"] == pytest.approx(6.4) and plan["warmup_epochs"] == 10
    assert plan["steps_per_epoch"] == 1_281_167 // 16384
    assert mae_plan(MaeProbe(epochs=9), 20_000)["warmup_epochs"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fewer than effective_batch=16384"):
        mae_plan(MaeProbe(), 2000)
    with pytest.raises(ValueError, match="not a multiple"):
        mae_plan(MaeProbe(effective_batch=100, batch_size=64), 2000)
    with pytest.raises(ValueError, match="warmup_epochs=5"):
        mae_plan(MaeProbe(epochs=5, warmup_epochs=5), 2000)
    with pytest.raises(ValueError, match="unknown mae setting.*lr_scale"):
        preset_settings("mae", lr_scale=2)


def test_mae_random_resized_crop_draws_once_and_clips():
    # Aspect 4 on a square image cannot fit: MAE clips the width to the image and keeps the height
    # sqrt(area / 4); torchvision would retry, then fall back to a centre crop of aspect 4 (h = 2-3).
    crop = MaeRandomResizedCrop(8, scale=(1.0, 1.0), ratio=(4.0, 4.0))
    params = crop.make_params([torch.zeros(3, 10, 10)])
    assert (params["width"], params["height"]) == (10, 5)
    assert 0 <= params["top"] <= 5 and params["left"] == 0


def test_mae_probe_separates_separable_features_and_not_shuffled_ones():
    x_train, y_train, x_test, y_test = separable(32)
    offset = 3.0  # a shared offset, as LayerNorm outputs have: the probe's BatchNorm removes it
    test = {"cls": x_test + offset, "label": y_test}
    out = train_mae_probe({"cls": x_train + offset, "label": y_train}, test, 10, SMALL_MAE)
    assert out["top1"] == 100.0
    assert out["plan"]["accum_steps"] == 2 and len(out["top1_per_epoch"]) == 30

    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    out = train_mae_probe({"cls": x_train + offset, "label": shuffled}, test, 10, SMALL_MAE)
    assert out["top1"] < 25.0  # chance is 10%


def test_grid_probe_separates_separable_features_and_not_shuffled_ones():
    x_train, y_train, x_test, y_test = separable(32)
    test = _grid_features(x_test, y_test)
    out = train_grid_probe(_grid_features(x_train, y_train), test, 10, SMALL_GRID)
    assert out["top1"] == 100.0
    assert len(out["grid"]) == 2 * 2 * 13 * 2 == out["plan"]["num_heads"]

    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    out = train_grid_probe(_grid_features(x_train, shuffled), test, 10, SMALL_GRID)
    assert out["top1"] < 25.0


def test_grid_selects_on_the_carved_split_never_on_the_test_split():
    x_train, y_train, x_test, y_test = separable(24, noise=2.5)  # hard: heads differ in accuracy
    train = _grid_features(x_train, y_train)
    honest = train_grid_probe(train, _grid_features(x_test, y_test), 10, SMALL_GRID)
    permuted_labels = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(1))]
    permuted = train_grid_probe(train, _grid_features(x_test, permuted_labels), 10, SMALL_GRID)

    assert permuted["best"]["name"] == honest["best"]["name"]
    assert permuted["best"]["val_top1"] == honest["best"]["val_top1"]
    assert [h["val_top1"] for h in permuted["grid"]] == [h["val_top1"] for h in honest["grid"]]
    assert permuted["best"]["val_top1"] == max(h["val_top1"] for h in permuted["grid"])
    # the test has teeth: picking on the test split would have chosen other heads
    by_test = [max(r["grid"], key=lambda h: h["test_top1"])["name"] for r in (honest, permuted)]
    assert by_test[0] != by_test[1]


def test_carved_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 3)
    fit, held = carve_val(labels, 0.1, seed=0)
    assert torch.bincount(labels[held]).tolist() == [2, 1, 1]
    assert sorted(fit.tolist() + held.tolist()) == list(range(33))
    assert torch.equal(held, carve_val(labels, 0.1, seed=0)[1])


def test_grid_heads_cover_dinov2s_grid_and_the_bn_variant():
    heads = grid_heads(GridProbe())
    assert len(heads) == 104 and len({h["name"] for h in heads}) == 104
    assert sorted({h["base_lr"] for h in heads}) == [
        1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1,
    ]  # fmt: skip
    assert {(h["n_last_blocks"], h["avgpool"], h["batchnorm"]) for h in heads} == {
        (n, a, b) for n in (1, 4) for a in (False, True) for b in (False, True)
    }


def test_sample_order_draws_fresh_permutations_per_pass_lazily():
    order = SampleOrder(10, per_pass=8, passes=3, seed=0)  # MAE: drop the last 2 of each epoch
    drawn = list(order)
    assert len(order) == len(drawn) == 24
    assert all(len(set(drawn[i : i + 8])) == 8 for i in (0, 8, 16))
    assert drawn[:8] != drawn[8:16]
    assert torch.cat(list(order.batches(4))).tolist() == drawn  # same order, in batches
    grid = SampleOrder(5, 5, 3, seed=0, total=12, index=torch.arange(100, 105))  # infinite sampler, cut
    assert [len(b) for b in grid.batches(5)] == [5, 5, 2] and set(grid) == set(range(100, 105))
