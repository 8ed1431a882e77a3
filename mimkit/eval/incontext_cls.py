"""In-context classification: label queries from a support set of n images per class, no training.

For each n in {1, 2, 5, 10} and each of ``episodes`` seeded draws (seed ``seed + e``), exactly n
train images per class are drawn without replacement (:func:`mimkit.eval.knn.draw_per_class`);
every val image is then classified two ways from frozen features (final-normed cls token by
default, as in :mod:`mimkit.eval.features`):

- **nearest prototype** (SimpleShot's CL2N, Wang et al. 2019): features centred on the support
  mean and L2-normalised; a class's prototype is the mean of its support features; predict the
  prototype of largest cosine similarity;
- **k-NN** over the support (DINO's weighted vote, exp(cosine / 0.07)) with k = min(k, support size).

Accuracy (%) is averaged over the episodes with a 95% interval ``mean +- 1.96 std / sqrt(episodes)``
(std with ddof 1), SimpleShot's report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from mimkit.data import build_source
from mimkit.eval.common import data_info, format_table, one_thread_on_cpu, result
from mimkit.eval.features import (
    describe_encoder,
    require_labelled_source,
    require_labels,
    source_features,
    split_labels,
)
from mimkit.eval.knn import FEW_SHOT_N, KNN_FEATURES, KNN_TEMPERATURE, draw_per_class, knn_top1
from mimkit.eval.preflight import check_positive, check_shots
from mimkit.eval.settings import ExtractSettings
from mimkit.models import Backbone

EPISODES = 10
CLS_K = 20


def prototype_top1(
    support: torch.Tensor, support_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor
) -> float:
    """Top-1 (%) of nearest-prototype classification after CL2N (centre on the support mean, L2)."""
    mean = support.mean(0, keepdim=True)
    s, q = F.normalize(support - mean, dim=1), F.normalize(queries - mean, dim=1)
    classes = support_labels.unique()
    protos = F.normalize(torch.stack([s[support_labels == c].mean(0) for c in classes]), dim=1)
    pred = classes[(q @ protos.T).argmax(1)]
    return 100.0 * float((pred == query_labels).float().mean())


def interval(values: list[float]) -> dict[str, Any]:
    """Mean, sample std, and the 95% interval half-width 1.96 std / sqrt(n) of per-episode values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n), "episodes": values}


def incontext_episodes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    shots: Sequence[int] = FEW_SHOT_N,
    episodes: int = EPISODES,
    seed: int = 0,
    k: int = CLS_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
) -> dict[int, dict[str, Any]]:
    """``{n: {"prototype": interval, "knn": interval, "k": k used}}`` over seeded support draws."""
    if episodes < 1:
        raise ValueError(f"episodes={episodes} must be at least 1")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    out = {}
    for n in sorted(set(shots)):
        if n < 1:
            raise ValueError(f"shots must be positive, got n={n}")
        proto, knn = [], []
        k_used = k
        for e in range(episodes):
            idx = draw_per_class(train_labels, n, torch.Generator().manual_seed(seed + e))
            support, labels = train_features[idx], train_labels[idx]
            proto.append(prototype_top1(support, labels, val_features, val_labels))
            k_used = min(k, len(idx))
            accs = knn_top1(
                support,
                labels,
                val_features,
                val_labels,
                ks=(k_used,),
                temperature=temperature,
                num_classes=num_classes,
            )
            knn.append(accs[k_used])
        out[n] = {"prototype": interval(proto), "knn": interval(knn), "k": k_used}
    return out


def incontext_classification(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    shots: Sequence[int] = FEW_SHOT_N,
    episodes: int = EPISODES,
    k: int = CLS_K,
    temperature: float = KNN_TEMPERATURE,
    feature: str = "cls",
    seed: int = 0,
    extract: ExtractSettings | None = None,
) -> dict[str, Any]:
    """In-context classification of ``encoder`` (see the module docstring); returns a result dict.

    Supports come from ``train_source``'s train split, queries are ``val_source``'s (default: the
    same source's) val split, both centre-cropped (:func:`mimkit.eval.features.source_features`,
    run as ``extract`` says; the features are the last block's, so ``n_last_blocks`` is 1).
    """
    if feature not in KNN_FEATURES:
        raise ValueError(f"unknown feature {feature!r}; valid: {', '.join(KNN_FEATURES)}")
    extract = extract or ExtractSettings()
    extract = replace(extract, img_size=extract.image_size(encoder), n_last_blocks=1)
    val_source = val_source or train_source
    # Everything the episodes need, before the first forward pass: labels in both splits, at least
    # the most shots in every class, a positive k, temperature and episode count.
    check_positive(k=k, temperature=temperature, episodes=episodes)
    if not shots:
        raise ValueError("--shots: give at least one number of support images per class")
    if val_source != train_source:
        require_labelled_source(val_source, "val")
    plain = build_source(train_source, "train", None)
    require_labels(plain, train_source, "train")
    labels = split_labels(encoder, train_source, "train", extract, plain)
    check_shots(labels, list(shots), len(plain), plain)
    train = source_features(encoder, train_source, "train", extract)
    val = source_features(encoder, val_source, "val", extract)
    num_classes = max(int(train["num_classes"]), int(val["num_classes"]))
    with one_thread_on_cpu(extract.device):  # supports of a few images per class: small kernels
        results = incontext_episodes(
            train[feature], train["label"], val[feature], val["label"], shots=shots, episodes=episodes,
            seed=seed, k=k, temperature=temperature, num_classes=num_classes,
        )  # fmt: skip
    settings = {
        "feature": feature,
        "precision": extract.precision,
        "shots": sorted(set(shots)),
        "episodes": episodes,
        "seed": seed,
        "episode_seeds": f"seed + e for e in 0..{episodes - 1}",
        "prototype": "CL2N (centre on the support mean, L2-normalise), class mean, max cosine",
        "knn": {"k": f"min({k}, support size)", "temperature": temperature, "weights": "exp(cosine / T)"},
        "interval": "95%: mean +- 1.96 std / sqrt(episodes), std with ddof 1",
        "extract": extract.to_dict(),
    }
    data = data_info(
        train_source, val_source, extract.img_size, len(train["label"]), len(val["label"]), num_classes
    )
    return result(
        "incontext", "in-context classification", describe_encoder(encoder), data, settings, results
    )


def format_classification(res: dict[str, Any]) -> str:
    """The human table of an :func:`incontext_classification` result."""
    enc = res["encoder"]
    title = f"in-context classification ({res['settings']['feature']}) of {enc['spec']}"
    title += " [random init]" if enc.get("random_init") else ""
    rows = []
    for n, r in res["results"].items():
        p, kn = r["prototype"], r["knn"]
        rows.append(
            [f"{n} per class", p["mean"], f"+-{p['ci95']:.2f}", kn["mean"], f"+-{kn['ci95']:.2f}", r["k"],
             len(p["episodes"])]
        )  # fmt: skip
    headers = ["support", "prototype top-1 %", "95% CI", "k-NN top-1 %", "95% CI", "k", "episodes"]
    return format_table(headers, rows, title)
