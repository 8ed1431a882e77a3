"""A pretrained encoder next to a randomly initialised one of the same shape (the floor).

Both encoders read the same centre-cropped images in one pass (each image decoded once), then
each gets DINO's weighted k-NN (T = 0.07, cls token) and MAE's linear probe (BN + linear, LARS,
warm-up + cosine, cls token) on the cached features.

The probe's defaults here differ from MAE's in two numbers, both because the sets are small: the
effective batch is 256 (MAE: 16384), and the base lr is 1.0 (MAE: 0.1). LARS moves a weight by
about ``lr x 0.001 x |w|`` per step, so over a run the head travels in proportion to
``blr x images x epochs / 256``: 640 times less on 2000 images than on ImageNet's 1.28M. On
features separable by construction (2000 images, 7 classes, 90 epochs) blr 0.1 reaches 70% and
blr 1.0 reaches 100%.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from mimkit.data import build_transform
from mimkit.data.transforms import Normalization
from mimkit.eval.common import data_info, format_table, result, write_json
from mimkit.eval.features import (
    classification_source,
    describe_encoder,
    extract_features,
    input_normalization,
    load_encoder,
    num_classes_of,
    require_labels,
)
from mimkit.eval.knn import KNN_KS, KNN_TEMPERATURE, knn_top1
from mimkit.eval.linear_probe import MaeProbe, mae_plan, train_mae_probe
from mimkit.eval.preflight import check_neighbours, check_positive
from mimkit.eval.settings import ExtractSettings

COMPARE_PROBE = MaeProbe(effective_batch=256, batch_size=256, blr=1.0)  # see the module docstring


def compare_encoders(
    encoder: str | os.PathLike,
    train_source: str,
    val_source: str | None = None,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    checkpoint: str | os.PathLike | None = None,
    probe: MaeProbe = COMPARE_PROBE,
    seed: int = 0,
    normalization: Normalization | None = None,
    extract: ExtractSettings | None = None,
    json_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """k-NN and the cached MAE linear probe for ``encoder`` and for a random init of its shape.

    Args:
        encoder: anything :func:`~mimkit.eval.features.load_encoder` reads (export, run directory,
            or a backbone name with ``checkpoint``).
        train_source / val_source: labelled sources; the bank and the probe's training images are
            the train split of ``train_source``, the scored images the val split of ``val_source``
            (default: ``train_source``).
        probe: the linear-probe settings (MAE's at effective batch 256 and blr 1.0 by default).
        seed: seed of the random init and of the probe.
        normalization: replaces the encoder's recorded input normalisation (both encoders).
        extract: how features are computed; both encoders are loaded at its ``img_size`` on its
            device and share one pass over the images, so there is no feature cache
            (``cache_dir`` is an error) and ``n_last_blocks`` is 1 (the cls token).
        json_path: also write the result there.
        verbose: print the side-by-side table.

    Returns:
        A result dict whose ``results`` map ``"pretrained"`` and ``"random init"`` to
        ``{"knn": {k: top-1 %}, "knn_patch_mean": {k: top-1 %}, "linear_probe": top-1 %,
        "linear_probe_per_epoch": [...]}`` (k-NN on the cls token and on the patch-token mean).
    """
    start = time.perf_counter()
    extract = extract or ExtractSettings()
    if extract.cache_dir is not None:
        raise ValueError(
            f"cache_dir={str(extract.cache_dir)!r} does not apply: both encoders share one pass over the "
            "images"
        )
    device = extract.device
    val_source = val_source or train_source
    encoders = {
        name: load_encoder(
            encoder,
            img_size=extract.img_size,
            checkpoint=None if random_init else checkpoint,
            random_init=random_init,
            seed=seed,
            device=device,
            normalization=normalization,
        )
        for name, random_init in (("pretrained", False), ("random init", True))
    }
    extract = replace(extract, img_size=extract.image_size(encoders["pretrained"]), n_last_blocks=1)
    img_size = extract.img_size
    transform = build_transform("eval", img_size, input_normalization(encoders["pretrained"]))
    feats, sizes, num_classes = {}, {}, 0
    sources = {"train": train_source, "val": val_source}
    datasets = {split: classification_source(uri, split, transform) for split, uri in sources.items()}
    for split, dataset in datasets.items():  # both before any feature is extracted
        require_labels(dataset, sources[split], split)
    # The probe's plan and the neighbour counts depend on the split sizes alone: checked before
    # the first forward pass too.
    num_train = len(datasets["train"])
    mae_plan(probe, num_train)
    if not any(k <= num_train for k in ks):
        check_neighbours(list(ks), num_train)
    check_positive(temperature=temperature)
    for split, dataset in datasets.items():
        feats[split] = extract_features(encoders, dataset, extract, desc=f"features {split}")
        sizes[split] = len(dataset)
        num_classes = max(num_classes, num_classes_of(dataset, feats[split]["pretrained"]["label"]))
    ks = sorted({k for k in ks if k <= sizes["train"]})
    probe = replace(probe, seed=seed)
    results = {}
    for name in encoders:
        train, val = feats["train"][name], feats["val"][name]
        vote = dict(ks=ks, temperature=temperature, num_classes=num_classes, device=device)
        knn = knn_top1(train["cls"], train["label"], val["cls"], val["label"], **vote)
        knn_mean = knn_top1(train["patch_mean"], train["label"], val["patch_mean"], val["label"], **vote)
        lin = train_mae_probe(train, val, num_classes, probe, device=device, progress=extract.progress)
        results[name] = {
            "knn": knn,
            "knn_patch_mean": knn_mean,
            "linear_probe": lin["top1"],
            "linear_probe_per_epoch": lin["top1_per_epoch"],
        }
    plan = lin["plan"]
    settings = {
        "precision": extract.precision,
        "knn": {
            "feature": "cls (and patch_mean)",
            "ks": ks,
            "temperature": temperature,
            "weights": "exp(similarity / T)",
        },
        "linear_probe": {"preset": "mae", "mode": "cached", **asdict(probe), **plan},
        "random_init": {"seed": seed, "init": "timm's VisionTransformer initialisation"},
        "extract": extract.to_dict(),
    }
    data = data_info(train_source, val_source, img_size, sizes["train"], sizes["val"], num_classes)
    out = result(
        "compare_random",
        "dino-weighted-knn + mae-linear-probe (cached)",
        {name: describe_encoder(enc) for name, enc in encoders.items()},
        data,
        settings,
        results,
        note="linear probe on cached centre-crop features (no augmentation): a fast variant, "
        "not the published protocol",
        seconds=round(time.perf_counter() - start, 1),
    )
    if json_path is not None:
        write_json(json_path, out)
    if verbose:
        print(format_comparison(out), flush=True)
    return out


def format_comparison(res: dict[str, Any]) -> str:
    """The side-by-side table of a :func:`compare_encoders` result."""
    names = list(res["results"])
    lp = res["settings"]["linear_probe"]
    rows = [
        [f"k-NN top-1 %, k={k}"] + [res["results"][n]["knn"][k] for n in names]
        for k in res["settings"]["knn"]["ks"]
    ]
    rows += [
        [f"k-NN top-1 %, k={k}, patch mean"] + [res["results"][n]["knn_patch_mean"][k] for n in names]
        for k in res["settings"]["knn"]["ks"]
    ]
    rows.append(["linear probe top-1 % (mae, cached)"] + [res["results"][n]["linear_probe"] for n in names])
    d = res["data"]
    title = (
        f"{res['encoder']['pretrained']['spec']} vs a random init of its shape: train {d['num_train']} / "
        f"val {d['num_val']} images, {d['num_classes']} classes, {d['img_size']} px"
    )
    footer = (
        f"k-NN: weighted by exp(s/{res['settings']['knn']['temperature']:g}), cls token. Linear probe: "
        f"BN + linear, LARS lr {lp['lr']:g} (blr {lp['blr']:g}), {lp['epochs']} epochs, effective batch "
        f"{lp['effective_batch']}, "
        f"on features of centre crops (cached). {res['seconds']:.0f} s."
    )
    return f"{format_table(['', *names], rows, title)}\n{footer}"


def format_gains(
    classification: dict[str, Any], segmentation: dict[str, Any] | None = None, k: int = 20
) -> str:
    """What pretraining bought over the random init, one line per protocol.

    ``classification`` is a :func:`compare_encoders` result, ``segmentation`` a
    :func:`~mimkit.eval.incontext.compare_incontext` one; ``k`` picks the k-NN row (the largest
    one measured if ``k`` was not).
    """
    res = classification["results"]
    ks = classification["settings"]["knn"]["ks"]
    k = k if k in ks else max(ks)
    rows = [
        [f"k-NN top-1 % (k={k}, cls)", res["pretrained"]["knn"][k], res["random init"]["knn"][k]],
        [
            f"k-NN top-1 % (k={k}, patch mean)",
            res["pretrained"]["knn_patch_mean"][k],
            res["random init"]["knn_patch_mean"][k],
        ],
        [
            "linear probe top-1 % (cached)",
            res["pretrained"]["linear_probe"],
            res["random init"]["linear_probe"],
        ],
    ]
    if segmentation is not None:
        rows.append(
            ["in-context mIoU %"]
            + [100 * segmentation[n]["results"]["miou"] for n in ("pretrained", "random init")]
        )
    for row in rows:
        row.append(f"{row[1] - row[2]:+.2f}")
    return format_table(
        ["", "pretrained", "random init", "gain (points)"], rows, "pretraining vs random init"
    )
