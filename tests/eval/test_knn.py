"""Weighted k-NN against hand computations; separable vs shuffled features; few-shot draws."""

import math

import pytest
import torch

from mimkit.eval import draw_per_class, few_shot_knn, knn_top1, nearest_neighbours, weighted_vote
from tests.eval import separable


def test_weighted_vote_equals_a_hand_computation():
    # Query (1, 0); bank at angles 0 (class 0), 30 and 45 degrees (class 1), 90 degrees (class 0).
    bank = torch.tensor([[1.0, 0.0], [0.866, 0.5], [0.7071, 0.7071], [0.0, 1.0]]) * 3  # scale is ignored
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 0.0]])
    sims, idx = nearest_neighbours(bank, query, k=3)
    assert idx.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(sims, torch.tensor([[1.0, 0.866, 0.7071]]), atol=1e-4, rtol=0)

    scores = weighted_vote(sims, labels[idx], num_classes=2, temperature=0.07)
    by_hand = torch.tensor([[math.exp(1 / 0.07), math.exp(0.866 / 0.07) + math.exp(0.7071 / 0.07)]])
    torch.testing.assert_close(scores, by_hand, rtol=1e-3, atol=0)
    # exp(14.29) beats exp(12.37) + exp(10.10): the nearest neighbour outvotes a 2-1 majority at T=0.07...
    test = dict(ks=(3,), num_classes=2)
    assert knn_top1(bank, labels, query, torch.tensor([0]), temperature=0.07, **test) == {3: 100.0}
    # ...while at a high temperature the votes are nearly equal and the majority (class 1) wins.
    assert knn_top1(bank, labels, query, torch.tensor([0]), temperature=100.0, **test) == {3: 0.0}


def test_chunked_search_equals_the_full_similarity_matrix():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(23, 8, generator=g), torch.randn(7, 8, generator=g)
    sims, idx = nearest_neighbours(bank, queries, k=6, query_chunk=3, bank_chunk=5)
    full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    want_s, want_i = full.topk(6, dim=1)
    torch.testing.assert_close(sims, want_s)
    assert torch.equal(idx, want_i)


def test_knn_is_perfect_on_separable_features_and_chance_on_shuffled_labels():
    x_train, y_train, x_test, y_test = separable(30)
    assert knn_top1(x_train, y_train, x_test, y_test, ks=(10, 20)) == {10: 100.0, 20: 100.0}

    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    accs = knn_top1(x_train, shuffled, x_test, y_test, ks=(10, 20))
    assert all(acc < 25.0 for acc in accs.values()), accs  # chance is 10%


def test_k_larger_than_the_bank_is_an_error():
    x, y, _, _ = separable(1)
    with pytest.raises(ValueError, match="exceeds the 10 training features"):
        knn_top1(x, y, x, y, ks=(20,))


def test_few_shot_draws_exactly_n_per_class_reproducibly():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 9)
    draw = draw_per_class(labels, 3, torch.Generator().manual_seed(5))
    assert torch.bincount(labels[draw]).tolist() == [3, 3, 3]
    assert len(set(draw.tolist())) == 9
    again = draw_per_class(labels, 3, torch.Generator().manual_seed(5))
    other = draw_per_class(labels, 3, torch.Generator().manual_seed(6))
    assert torch.equal(draw, again) and not torch.equal(draw, other)
    with pytest.raises(ValueError, match="class 1 has 4 training samples"):
        draw_per_class(labels, 5, torch.Generator())


def test_few_shot_reports_mean_and_spread_of_seeded_tries():
    x_train, y_train, x_test, y_test = separable(10, num_classes=5, noise=2.0)  # noisy: draws differ
    kw = dict(shots=(1, 5), tries=4, seed=7, ks=(2, 10, 20))
    out = few_shot_knn(x_train, y_train, x_test, y_test, **kw)
    assert set(out) == {1, 5}
    assert set(out[1]) == {1} and set(out[5]) == {2, 5}  # k in {k <= n} | {n}
    stats = out[5][5]
    assert len(stats["tries"]) == 4 and stats["std"] > 0
    assert stats["mean"] == pytest.approx(sum(stats["tries"]) / 4)
    m = stats["mean"]
    assert stats["std"] == pytest.approx(math.sqrt(sum((t - m) ** 2 for t in stats["tries"]) / 3))
    # each try is plain k-NN on its own seeded draw
    idx = draw_per_class(y_train, 5, torch.Generator().manual_seed(7 + 2))
    third = knn_top1(x_train[idx], y_train[idx], x_test, y_test, ks=(5,))[5]
    assert stats["tries"][2] == third
    assert few_shot_knn(x_train, y_train, x_test, y_test, **kw) == out
