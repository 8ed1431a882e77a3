"""Confusion-matrix metrics against direct computations; the Hungarian solver against brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from mimkit.eval.segmetrics import ConfusionMatrix, hungarian


def test_confusion_matrix_miou_equals_a_direct_computation():
    # 3 classes, 255 ignored. Ground truth and prediction, pixel by pixel:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1], [0, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1], [0, 2, 0, 2]])
    conf = ConfusionMatrix(3, ignore_index=255)
    conf.update(pred[:2], target[:2])  # streamed in two parts
    conf.update(pred[2:], target[2:])
    # Direct: over the 10 non-ignored pixels, IoU_c = |pred=c & gt=c| / |pred=c | gt=c|.
    keep = target != 255
    p, t = pred[keep], target[keep]
    ious = [float(((p == c) & (t == c)).sum()) / float(((p == c) | (t == c)).sum()) for c in range(3)]
    # By hand: class 0 inter 2 ((0,0), (2,0)), union 4; class 1 inter 3, union 5; class 2 inter 2, union 4.
    assert ious == [2 / 4, 3 / 5, 2 / 4]
    assert conf.iou().tolist() == pytest.approx(ious)
    assert conf.miou() == pytest.approx(sum(ious) / 3)
    assert conf.pixel_accuracy() == pytest.approx(7 / 10)
    assert int(conf.conf.sum()) == 10


def test_a_class_absent_everywhere_is_not_averaged_but_a_false_positive_class_counts():
    conf = ConfusionMatrix(4)
    conf.update(
        torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 1])
    )  # class 2 predicted, never true; 3 absent
    iou = conf.iou()
    assert math.isnan(iou[3]) and iou[2] == 0.0
    assert conf.miou() == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert conf.summary()["classes_scored"] == 3


def test_out_of_range_ground_truth_is_an_error_naming_it():
    conf = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(ValueError, match="class 7 is outside 0..2"):
        conf.update(torch.tensor([0, 1]), torch.tensor([7, 255]))


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (6, 6)])
def test_hungarian_finds_the_brute_force_optimum(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.random(shape)
        cols = hungarian(cost)
        assert len(set(cols.tolist())) == shape[0]
        best = min(
            sum(cost[i, c] for i, c in enumerate(perm))
            for perm in itertools.permutations(range(shape[1]), shape[0])
        )
        assert cost[np.arange(shape[0]), cols].sum() == pytest.approx(best)


def test_hungarian_miou_ignores_class_renaming_identity_miou_does_not():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4000,), generator=g)
    noise = torch.randint(0, 5, (4000,), generator=g)
    pred = torch.where(torch.rand(4000, generator=g) < 0.7, target, noise)  # 70% right, rest random
    perm = torch.tensor([2, 0, 4, 1, 3])

    plain, renamed = ConfusionMatrix(5), ConfusionMatrix(5)
    plain.update(pred, target)
    renamed.update(pred, perm[target])  # the same segmentation with the ground-truth ids renamed
    assert renamed.hungarian_miou() == pytest.approx(plain.hungarian_miou(), abs=1e-12)
    assert plain.hungarian_miou() == pytest.approx(plain.miou())  # already the best matching
    assert renamed.miou() < plain.miou() - 0.3
    assert torch.equal(renamed.hungarian_mapping()[perm], torch.arange(5))  # it recovers the renaming
