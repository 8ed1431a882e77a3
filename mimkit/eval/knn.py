"""Weighted k-NN (DINO, Caron et al. 2021) and its few-shot variant (DINOv2's ``--n-per-class-list``).

k-NN: features are L2-normalised; for each query the k training features of highest cosine
similarity s_j vote for their labels with weight ``exp(s_j / T)``, T = 0.07; the prediction is
the class with the largest summed weight (ties go to the lower class index). Top-1 is reported
for k in {10, 20, 100, 200}; DINO's headline is k = 20. DINOv2 weights by softmax(s / T) over
the neighbours, a per-query rescaling with the same argmax.

The search is chunked over queries and over the training bank, keeping a running top-k, so a
1.28M x 768 bank never needs more than one (query chunk x bank chunk) similarity block at a time.

Few-shot: for each of ``tries`` draws (seed ``seed + t``) exactly n training images per class are
drawn uniformly without replacement, and k-NN runs on that bank with k in
``{k in ks : k <= n} | {n}`` (DINOv2's rule); the mean and the standard deviation (ddof 1) over the
draws are reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mimkit.data import build_source
from mimkit.eval.common import data_info, format_table, one_thread_on_cpu, result
from mimkit.eval.features import (
    describe_encoder,
    require_labelled_source,
    require_labels,
    source_features,
    split_labels,
)
from mimkit.eval.preflight import check_neighbours, check_positive, check_shots
from mimkit.eval.settings import ExtractSettings
from mimkit.models import Backbone

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
FEW_SHOT_N = (1, 2, 5, 10)
FEW_SHOT_TRIES = 5


def _normalise(features: torch.Tensor, chunk: int) -> torch.Tensor:
    """L2-normalised float32 copy, built chunk by chunk so no second full-size temporary exists."""
    out = torch.empty(features.shape, dtype=torch.float32, device=features.device)
    for i in range(0, len(features), chunk):
        out[i : i + chunk] = F.normalize(features[i : i + chunk].float(), dim=1)
    return out


@torch.no_grad()
def nearest_neighbours(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    device: str | torch.device = "cpu",
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices of each query's k nearest bank rows, best first.

    Args:
        bank: (N, D) training features, any scale (normalised here).
        queries: (Q, D).
        k: neighbours per query, at most N.

    Returns:
        ``(sims (Q, k), indices (Q, k))`` on the CPU.
    """
    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} must be between 1 and the bank size {len(bank)}")
    device = torch.device(device)
    bank = _normalise(bank, bank_chunk)
    sims_out, idx_out = [], []
    chunks = range(0, len(queries), query_chunk)
    for q0 in tqdm(chunks, desc="k-NN", disable=not progress, leave=False):
        q = F.normalize(queries[q0 : q0 + query_chunk].float().to(device), dim=1)
        best_s = torch.empty(len(q), 0, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
        for b0 in range(0, len(bank), bank_chunk):
            block = bank[b0 : b0 + bank_chunk].to(device, non_blocking=True)
            s, i = (q @ block.T).topk(min(k, len(block)), dim=1)
            best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + b0], 1).gather(1, order)
        sims_out.append(best_s.cpu())
        idx_out.append(best_i.cpu())
    return torch.cat(sims_out), torch.cat(idx_out)


def weighted_vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = KNN_TEMPERATURE
) -> torch.Tensor:
    """Class scores (Q, C) = sum over the given neighbours of ``exp(s / T)`` per neighbour label.

    Args:
        sims: (Q, k) cosine similarities.
        neighbour_labels: (Q, k) long labels of those neighbours.
    """
    weights = (sims / temperature).exp()
    scores = torch.zeros(len(sims), num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    **chunks: int,
) -> dict[int, float]:
    """Top-1 accuracy (%) of weighted k-NN for every k in ``ks`` (one search for the largest k).

    A k larger than the training bank is an error; ``chunks`` go to :func:`nearest_neighbours`.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks} must be positive integers")
    if ks[-1] > len(train_features):
        raise ValueError(f"k={ks[-1]} exceeds the {len(train_features)} training features; pass smaller ks")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    sims, idx = nearest_neighbours(
        train_features, test_features, ks[-1], device=device, progress=progress, **chunks
    )
    neighbour_labels = train_labels.cpu()[idx]
    out = {}
    for k in ks:
        pred = weighted_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature).argmax(1)
        out[k] = 100.0 * int((pred == test_labels.cpu()).sum()) / len(test_labels)
    return out


def draw_per_class(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of exactly ``n`` samples of every class in ``labels``, uniformly without replacement.

    Returned sorted by class, then by draw order; a class with fewer than ``n`` samples is an error.
    """
    picks = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < n:
            raise ValueError(f"class {c} has {len(members)} training samples, fewer than n={n} per class")
        picks.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(picks)


def few_shot_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    shots: Sequence[int] = FEW_SHOT_N,
    tries: int = FEW_SHOT_TRIES,
    seed: int = 0,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[int, dict[int, dict]]:
    """k-NN on n images per class, over ``tries`` seeded draws.

    Returns:
        ``{n: {k: {"mean": %, "std": %, "tries": [% per draw]}}}`` with k in
        ``{k in ks : k <= n} | {n}``; ``std`` is the sample standard deviation (0 for one try).
    """
    if tries < 1:
        raise ValueError(f"tries={tries} must be at least 1")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    out: dict[int, dict[int, dict]] = {}
    for n in tqdm(sorted(set(shots)), desc="few-shot", disable=not progress, leave=False):
        if n < 1:
            raise ValueError(f"shots must be positive, got n={n}")
        ks_n = sorted({k for k in ks if k <= n} | {n})
        runs: dict[int, list[float]] = {k: [] for k in ks_n}
        for t in range(tries):
            idx = draw_per_class(train_labels, n, torch.Generator().manual_seed(seed + t))
            accs = knn_top1(
                train_features[idx],
                train_labels[idx],
                test_features,
                test_labels,
                ks=ks_n,
                temperature=temperature,
                num_classes=num_classes,
                device=device,
            )
            for k in ks_n:
                runs[k].append(accs[k])
        out[n] = {k: _mean_std(v) for k, v in runs.items()}
    return out


def _mean_std(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "tries": values}


# ----------------------------------------------------------------------------- source-level API

KNN_FEATURES = ("cls", "patch_mean")


def check_knn(
    encoder: Backbone,
    train_source: str,
    val_source: str,
    *,
    ks: Sequence[int],
    temperature: float,
    shots: Sequence[int],
    tries: int,
    extract: ExtractSettings,
) -> None:
    """What :func:`knn_eval` checks before its first forward pass: labels in both splits, every k
    at most the bank, a positive temperature, and (with ``shots``) every class holding the most shots."""
    if val_source != train_source:  # the same source has the same layout in both splits
        require_labelled_source(val_source, "val")
    plain = build_source(train_source, "train", None)
    require_labels(plain, train_source, "train")
    check_neighbours(list(ks), len(plain))
    check_positive(temperature=temperature)
    if shots:
        check_positive(tries=tries)
        labels = split_labels(encoder, train_source, "train", extract, plain)
        check_shots(labels, list(shots), len(plain), plain)


def knn_eval(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    feature: str = "cls",
    shots: Sequence[int] = FEW_SHOT_N,
    tries: int = FEW_SHOT_TRIES,
    seed: int = 0,
    extract: ExtractSettings | None = None,
) -> dict[str, Any]:
    """Weighted k-NN and few-shot k-NN of ``encoder``: bank = ``train_source``'s train split,
    queries = ``val_source``'s (default: the same source's) val split, both centre-cropped.

    ``feature`` is ``cls`` (DINO's) or ``patch_mean``; ``shots=()`` skips the few-shot part.
    ``extract`` says how features are computed (its device also runs the search; both features
    come from the last block, so ``n_last_blocks`` is 1). Returns a result dict (see
    :mod:`mimkit.eval.common`).
    """
    if feature not in KNN_FEATURES:
        raise ValueError(f"unknown k-NN feature {feature!r}; valid: {', '.join(KNN_FEATURES)}")
    extract = extract or ExtractSettings()
    extract = replace(extract, img_size=extract.image_size(encoder), n_last_blocks=1)
    device, progress = extract.device, extract.progress
    val_source = val_source or train_source
    check_knn(encoder, train_source, val_source, ks=ks, temperature=temperature, shots=shots, tries=tries,
              extract=extract)  # fmt: skip
    train = source_features(encoder, train_source, "train", extract)
    test = source_features(encoder, val_source, "val", extract)
    num_classes = max(int(train["num_classes"]), int(test["num_classes"]))
    args = (train[feature], train["label"], test[feature], test["label"])
    vote = dict(temperature=temperature, num_classes=num_classes, device=device)
    results: dict[str, Any] = {"knn": knn_top1(*args, ks=ks, progress=progress, **vote)}
    if shots:
        with one_thread_on_cpu(device):  # banks of a few images per class: small kernels
            results["few_shot"] = few_shot_knn(
                *args, shots=shots, tries=tries, seed=seed, ks=ks, progress=progress, **vote
            )
    settings = {
        "feature": feature,
        "precision": extract.precision,
        "ks": sorted(set(ks)),
        "temperature": temperature,
        "similarity": "cosine (L2-normalised features)",
        "weights": "exp(similarity / temperature)",
        "few_shot": {
            "shots": sorted(set(shots)),
            "tries": tries,
            "seed": seed,
            "ks": "{k in ks : k <= n} | {n}",
        },
        "extract": extract.to_dict(),
    }
    data = data_info(
        train_source, val_source, extract.img_size, len(train["label"]), len(test["label"]), num_classes
    )
    return result("knn", "dino-weighted-knn", describe_encoder(encoder), data, settings, results)


def format_knn(res: dict[str, Any]) -> str:
    """The human table of a :func:`knn_eval` result."""
    enc = res["encoder"]
    title = (
        f"weighted k-NN (T={res['settings']['temperature']:g}, {res['settings']['feature']}) of {enc['spec']}"
    )
    title += " [random init]" if enc.get("random_init") else ""
    knn = res["results"]["knn"]
    out = format_table(["k", "top-1 %"], [[f"k={k}", acc] for k, acc in knn.items()], title)
    few = res["results"].get("few_shot")
    if few:
        rows = [
            [f"{n} per class", f"k={k}", s["mean"], s["std"], len(s["tries"])]
            for n, by_k in few.items()
            for k, s in by_k.items()
        ]
        out += "\n\n" + format_table(["few-shot", "k", "mean top-1 %", "std", "draws"], rows)
    return out
