"""Linear segmentation probe of a frozen encoder: DINOv2's protocol on mimkit's segmentation sources.

A linear head (:mod:`mimkit.eval.seg_head`: BatchNorm + 1x1 conv by default, as DINOv2's
``BNHead``, or the bare linear map) reads the final-normed patch tokens of the last block (or the
last 4, concatenated: DINOv2's "lin+4") of a frozen encoder; its logits are upsampled bilinearly
to the label map and trained with cross-entropy, the ignore label left out. It trains on the train
split of ``voc:PATH``, ``ade20k:PATH``, ``synthetic:shapes`` or ``synthetic:textures``
(:mod:`mimkit.eval.seg_data`) and is scored on the val split with the in-context tool's metrics
(:mod:`mimkit.eval.segmetrics`: identity mIoU, the primary number; Hungarian mIoU; per-class IoU;
pixel accuracy).

What follows DINOv2 (Oquab et al. 2023, section 7.4 and its released mmsegmentation configs; the
values are :class:`~mimkit.eval.seg_head.SegProbe`'s defaults):

- features: the last block's patch tokens through the final norm (``get_intermediate_layers(n,
  norm=True)``); the cls token is not used;
- head: BN (affine) + 1x1 conv, weight N(0, 0.01); AdamW lr 1e-3, weight decay 1e-4, betas
  (0.9, 0.999); poly decay (power 1) over 40,000 iterations after a 1,500-iteration linear
  warm-up from 1e-6 x lr; 16 images per iteration; pixel cross-entropy averaged over every
  pixel (mmseg 0.x), ignore label 255; BatchNorm statistics over the step's 16 images (one
  process here; SyncBN across DINOv2's 8 GPUs gives the same);
- training images: random rescale (0.5-2x), a 512 crop with ``cat_max_ratio`` 0.75, flip, padding
  with the ignore label (:mod:`mimkit.eval.seg_augment`; the crop is the input size here).

What does not:

- photometric distortion is left out of the training pipeline (see :mod:`mimkit.eval.seg_augment`);
- val images are resized to a square at the input size and scored at that size (the in-context
  tool's convention, so the two tools' numbers share one evaluation); DINOv2 (mmseg) resizes the
  shorter side to 512, aspect kept, and scores the logits resized back to the native resolution;
- no multi-scale test-time augmentation (the "+ms" row) and no sliding window.

``cached=True`` trains the head on tokens extracted once from the resized train images (no
augmentation, one forward pass per image): a much faster variant, labelled ``cached`` in every
output and not the published protocol. On a CPU 40,000 iterations are long; pass fewer
(``iterations=``): the warm-up follows as the same fraction (1,500 / 40,000). On
``synthetic:textures`` the class is a texture period in pixels, which the 0.5-2x rescale changes
(a medium texture at 2x is a coarse one), so there the augmented protocol presumably trains on partly wrong
labels and ``cached`` is the meaningful reading: the MAE demo encoder scored 39.5 mIoU augmented
and 52.4 cached at 2,000 iterations (random init 27.9 and 32.4).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mimkit.data import build_source
from mimkit.data.transforms import Normalization
from mimkit.eval.common import format_table, result, write_json
from mimkit.eval.features import (
    describe_encoder,
    input_normalization,
    pretrained_and_random_init,
)
from mimkit.eval.preflight import check_fits, check_img_size, format_bytes
from mimkit.eval.seg_augment import CAT_MAX_RATIO, RATIO_RANGE, seg_probe_transform
from mimkit.eval.seg_data import IGNORE_INDEX, seg_classes, seg_transform
from mimkit.eval.seg_head import SegBatch, SegProbe, score_seg_head, train_seg_head
from mimkit.eval.settings import PRECISIONS, ExtractSettings
from mimkit.models import Backbone

DEMO_SOURCE = "synthetic:textures?size=64&train=256&val=128"
PROTOCOL = "dinov2-linear-segmentation"
SOURCE_HINT = "synthetic:shapes, synthetic:textures, voc:PATH or ade20k:PATH"


# ----------------------------------------------------------------------------- features


def dense_tokens(
    encoder: Backbone, images: torch.Tensor, n_last_blocks: int = 1, precision: str = "fp32"
) -> torch.Tensor:
    """Final-normed patch tokens of the last ``n_last_blocks`` blocks, concatenated: (B, N, n x D) float32.

    The oldest block comes first; prefix (cls) tokens are dropped; patches are row-major.
    """
    dtype = PRECISIONS[precision]
    with (
        torch.no_grad(),
        torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        outs = encoder.forward_intermediates(
            images, indices=n_last_blocks, norm=True, output_fmt="NLC", intermediates_only=True
        )
    return torch.cat([t.float() for t in outs], dim=-1)


def _loader(dataset: Dataset, batch_size: int, extract: ExtractSettings, **kw: Any) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=extract.workers,
        pin_memory=torch.device(extract.device).type == "cuda",
        **kw,
    )


def encoded_batches(
    encoder: Backbone,
    loader: DataLoader,
    n_last_blocks: int,
    extract: ExtractSettings,
    desc: str | None,
) -> Iterator[SegBatch]:
    """``(dense tokens, masks)`` of every batch of ``loader``, on ``extract.device``.

    ``desc`` names the progress bar (None: no bar, as when the head's training loop counts).
    """
    device = torch.device(extract.device)
    bar = tqdm(loader, desc=desc, disable=desc is None or not extract.progress, leave=False)
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        yield dense_tokens(encoder, images, n_last_blocks, extract.precision), batch["mask"].to(device)


def sample_order(num: int, iterations: int, batch_size: int, seed: int) -> torch.Tensor:
    """The training samples in order: seeded permutations of ``num`` back to back, ``iterations x batch``.

    An epoch boundary may fall inside a batch, so every image is seen equally often and a batch
    may be larger than the training split.
    """
    need = iterations * batch_size
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(num, generator=gen) for _ in range(math.ceil(need / num))]
    return torch.cat(perms)[:need]


def cached_batches(tokens: torch.Tensor, masks: torch.Tensor, order: torch.Tensor, batch_size: int):
    """Training batches sliced from tokens (M, N, D) and masks (M, H, W) cached once, in ``order``."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield tokens[idx], masks[idx]


# ----------------------------------------------------------------------------- checks and plan


def check_seg_source(uri: str, split: str) -> tuple[Dataset, tuple[str, ...], int | None]:
    """``uri``'s ``split`` (untransformed), its class names and ignore label; errors name the problem.

    Reads one sample, never the encoder: every check of a run happens before its first forward pass.
    """
    dataset = build_source(uri, split, None)
    if len(dataset) == 0:
        raise ValueError(f"source {uri!r} has no samples in its {split} split")
    sample = dataset[0]
    if "mask" not in sample:
        off = " (segmentation=0 leaves them out)" if getattr(dataset, "segmentation", True) is False else ""
        raise ValueError(
            f"source {uri!r} ({split} split) yields no segmentation masks{off}; the segmentation probe "
            f"reads {SOURCE_HINT}"
        )
    try:
        names, ignore = seg_classes(dataset, uri)
    except ValueError:
        raise ValueError(
            f"source {uri!r} has no segmentation classes; the segmentation probe reads {SOURCE_HINT}"
        ) from None
    return dataset, names, ignore


def check_geometry(encoder: Backbone, settings: SegProbe, extract: ExtractSettings) -> int:
    """The input size, after checking it and ``n_last_blocks`` against the encoder."""
    depth = len(encoder.blocks)
    if settings.n_last_blocks > depth:
        raise ValueError(
            f"n_last_blocks={settings.n_last_blocks} exceeds the encoder's depth {depth}; valid: 1..{depth}"
        )
    img_size, patch = encoder.patch_embed.img_size[0], encoder.patch_embed.patch_size[0]
    if extract.img_size not in (None, img_size):
        raise ValueError(
            f"img_size={extract.img_size} differs from the encoder's input size {img_size}; load the "
            f"encoder at that size (load_encoder(..., img_size={extract.img_size}))"
        )
    check_img_size(img_size, patch)
    if extract.cache_dir is not None:
        raise ValueError(
            f"cache_dir={str(extract.cache_dir)!r} does not apply to the segmentation probe: cached "
            "patch tokens are kept in memory"
        )
    return img_size


def seg_probe_plan(
    encoder: Backbone, settings: SegProbe, num_train: int, num_val: int, num_classes: int, cached: bool
) -> dict[str, Any]:
    """Forward passes, head size and the memory a run will need, before it starts."""
    n = math.prod(encoder.patch_embed.grid_size)
    dim = encoder.embed_dim * settings.n_last_blocks
    img = encoder.patch_embed.img_size[0]
    steps, batch = settings.iterations, settings.batch_size
    # Per step: the upsampled logits, their gradient and the softmax of the cross-entropy.
    logits = 3 * batch * num_classes * img * img * 4
    cache = num_train * n * dim * 4 + num_train * img * img if cached else 0
    return {
        "forwards": (num_train if cached else steps * batch) + num_val,
        "passes_over_train": steps * batch / num_train,
        "feature_dim": dim,
        "head_parameters": dim * num_classes + num_classes + (2 * dim if settings.head == "bn" else 0),
        "cache_bytes": cache,
        "logit_bytes_per_step": logits,
    }


def check_seg_plan(plan: dict[str, Any], device: Any) -> None:
    """Fail before the first forward pass when the token cache or one step's logits will not fit."""
    if plan["cache_bytes"]:
        check_fits(
            plan["cache_bytes"],
            "cpu",
            "the cached train tokens",
            "train without --cached (augmented), on fewer train images or at a smaller --img-size",
        )
    check_fits(
        plan["logit_bytes_per_step"], device, "one step's upsampled logits", "pass a smaller --batch-size"
    )


def describe_seg_plan(plan: dict[str, Any], settings: SegProbe, cached: bool, device: Any) -> str:
    """The line printed before a run: what it will compute and the memory it needs."""
    s = settings
    mode = (
        f"cached tokens {format_bytes(plan['cache_bytes'])} (patch tokens + masks of the train split, fp32)"
        if cached
        else "augmented (a frozen forward pass per training image)"
    )
    return (
        f"seg probe: {s.iterations:,} iterations x {s.batch_size} images "
        f"({plan['passes_over_train']:.1f} passes over the train split), {plan['forwards']:,} frozen "
        f"forward passes on {device}; {mode}; head {plan['head_parameters']:,} parameters on "
        f"{plan['feature_dim']}-d tokens; logits {format_bytes(plan['logit_bytes_per_step'])} per step"
    )


# ----------------------------------------------------------------------------- the probe


def seg_probe(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    settings: SegProbe | None = None,
    cached: bool = False,
    extract: ExtractSettings | None = None,
    log=print,
) -> dict[str, Any]:
    """Train a linear segmentation head on ``encoder``'s frozen patch tokens and score it.

    The head trains on ``train_source``'s train split and is scored on ``val_source``'s (default:
    the same source's) val split, at the encoder's input size. ``settings`` default to DINOv2's
    (:class:`~mimkit.eval.seg_head.SegProbe`); ``cached=True`` trains on tokens extracted once,
    without augmentation. ``extract`` gives precision, device (also the head's), workers and
    progress bars; its ``batch_size`` is the forward-pass batch of the cached extraction and of
    the val pass (training passes take ``settings.batch_size``); its ``img_size``, when set, must
    be the encoder's. Every input is checked before the first forward pass; ``log`` then receives
    the plan (None: quiet). Returns a result dict (:mod:`mimkit.eval.common`).
    """
    settings = settings or SegProbe()
    extract = extract or ExtractSettings(batch_size=settings.batch_size)
    img_size = check_geometry(encoder, settings, extract)
    val_source = val_source or train_source
    train_plain, names, ignore = check_seg_source(train_source, "train")
    val_plain, val_names, val_ignore = check_seg_source(val_source, "val")
    if (names, ignore) != (val_names, val_ignore):
        raise ValueError(
            f"{train_source!r} ({len(names)} classes, ignore {ignore}) and {val_source!r} "
            f"({len(val_names)} classes, ignore {val_ignore}) have different classes or ignore labels"
        )
    extract = replace(extract, img_size=img_size)
    device = torch.device(extract.device)
    norm = input_normalization(encoder)
    grid = tuple(encoder.patch_embed.grid_size)
    num_classes, n_last = len(names), settings.n_last_blocks
    plan = seg_probe_plan(encoder, settings, len(train_plain), len(val_plain), num_classes, cached)
    if log is not None:
        log(describe_seg_plan(plan, settings, cached, device))
    check_seg_plan(plan, device)

    start = time.perf_counter()
    encoder.to(device).eval()
    order = sample_order(len(train_plain), settings.iterations, settings.batch_size, settings.seed)
    if cached:
        train = build_source(train_source, "train", seg_transform("val", img_size, norm))
        loader = _loader(train, extract.batch_size, extract, shuffle=False)
        parts = [
            (t.cpu(), m.to("cpu", torch.uint8))  # on the CPU batch by batch: a GPU holds one batch
            for t, m in encoded_batches(encoder, loader, n_last, extract, "features train")
        ]
        tokens, masks = (torch.cat(p) for p in zip(*parts))
        del parts
        batches = cached_batches(tokens, masks, order, settings.batch_size)
    else:
        train = build_source(train_source, "train", seg_probe_transform(img_size, norm))
        gen = torch.Generator().manual_seed(settings.seed)  # seeds the workers' augmentation
        loader = _loader(train, settings.batch_size, extract, sampler=order.tolist(), generator=gen)
        batches = encoded_batches(encoder, loader, n_last, extract, None)
    featured = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # the augmentation when it runs in this process
        trained = train_seg_head(
            batches, plan["feature_dim"], num_classes, grid, settings, device=device,
            progress=extract.progress,
        )  # fmt: skip
    val = build_source(val_source, "val", seg_transform("val", img_size, norm))
    val_loader = _loader(val, extract.batch_size, extract, shuffle=False)
    scored = time.perf_counter()
    conf = score_seg_head(
        trained["head"], encoded_batches(encoder, val_loader, n_last, extract, "val"), num_classes, grid,
        ignore, device=device,
    )  # fmt: skip
    end = time.perf_counter()

    mode = "cached" if cached else "augmented"
    settings_out = {
        **asdict(settings),
        "warmup_iters": settings.warmup,
        "mode": mode,
        "input_size": img_size,
        "patch_size": encoder.patch_embed.patch_size[0],
        "grid": list(grid),
        "feature": f"final-normed patch tokens of the last {n_last} block(s), concatenated oldest first",
        "feature_dim": plan["feature_dim"],
        "head_description": (
            "BatchNorm (affine) + linear (1x1 conv), weight N(0, 0.01), bias 0"
            if settings.head == "bn"
            else "linear (1x1 conv), weight N(0, 0.01), bias 0"
        ),
        "optimizer": f"AdamW(lr={settings.lr:g}, betas={tuple(settings.betas)}, "
        f"weight_decay={settings.weight_decay:g})",
        "schedule": f"poly(power={settings.power:g}) to 0 over {settings.iterations} iterations, linear "
        f"warm-up over {settings.warmup} from {settings.warmup_ratio:g} x lr",
        "loss": "cross-entropy of the logits upsampled bilinearly to the label map, ignored pixels "
        "excluded, sum over the batch's pixels / all its pixels (mmseg's avg_non_ignore=False)",
        "train_transform": (
            "resize to the input size (no augmentation), tokens cached once"
            if cached
            else f"rescale shorter side x U{RATIO_RANGE} (aspect kept), crop {img_size} with "
            f"cat_max_ratio {CAT_MAX_RATIO}, flip, normalise, pad with 0 / ignore {IGNORE_INDEX}"
        ),
        "val_transform": f"resize to {img_size}x{img_size} (bilinear, aspect not kept); scored at that size",
        "upsampling": "bilinear (align_corners=False) of the logits, then argmax",
        "ignore_index": ignore,
        "normalisation": norm.to_dict(),
        "precision": extract.precision,
        "extract": extract.to_dict(),
    }
    data = {
        "train": f"{train_source} [train split]",
        "val": f"{val_source} [val split]",
        "num_train": len(train_plain),
        "num_val": len(val_plain),
        "num_classes": num_classes,
        "class_names": list(names),
    }
    results = {
        **conf.summary(names),
        "train_loss_final": trained["final_loss"],
        "train_loss_curve": trained["loss_curve"],
        "head_parameters": plan["head_parameters"],
        "seconds_features": round(featured - start, 2),
        "seconds_train": round(scored - featured, 2),
        "seconds_eval": round(end - scored, 2),
    }
    note = (
        "cached: the head trained on tokens of the resized train images extracted once, without "
        "augmentation (a fast variant, not the published protocol)"
        if cached
        else "augmented: DINOv2's linear protocol (without photometric distortion; val resized to a square)"
    )
    return result(
        "seg_probe", PROTOCOL, describe_encoder(encoder), data, settings_out, results, mode=mode, note=note
    )


def _seconds(res: dict[str, Any]) -> float:
    r = res["results"]
    return r["seconds_features"] + r["seconds_train"] + r["seconds_eval"]


def _footer(res: dict[str, Any], seconds: str | None = None) -> str:
    s, r, d = res["settings"], res["results"], res["data"]
    head = "BN + linear" if s["head"] == "bn" else "linear"
    return (
        f"{head} head on {s['feature_dim']}-d tokens (last {s['n_last_blocks']} block(s)), "
        f"{s['iterations']} iterations x {s['batch_size']} images, AdamW lr {s['lr']:g} wd "
        f"{s['weight_decay']:g}, poly with {s['warmup_iters']} warm-up; {res['mode']}"
        + (" (not the published protocol)" if res["mode"] == "cached" else "")
        + f"; {d['num_train']} train / {d['num_val']} val images at {s['input_size']} px; final train "
        f"loss {r['train_loss_final']:.3f}; " + (seconds or f"{_seconds(res):.1f} s") + "."
    )


def format_seg_probe(res: dict[str, Any]) -> str:
    """The human table of a :func:`seg_probe` result (mIoU etc. in %)."""
    r, enc = res["results"], res["encoder"]
    title = f"linear segmentation probe ({res['mode']}) of {enc['spec']}" + (
        " [random init]" if enc.get("random_init") else ""
    )
    rows = [
        ["mIoU % (identity)", 100 * r["miou"]],
        ["mIoU % (Hungarian)", 100 * r["miou_hungarian"]],
        ["pixel accuracy %", 100 * r["pixel_accuracy"]],
    ]
    rows += [[f"  IoU % {name}", "-" if v is None else 100 * v] for name, v in r["per_class_iou"].items()]
    return f"{format_table(['metric', 'value'], rows, title)}\n{_footer(res)}"


# ----------------------------------------------------------------------------- beside a random init


def compare_seg_probe(
    encoder: str | os.PathLike,
    train_source: str = DEMO_SOURCE,
    val_source: str | None = None,
    *,
    settings: SegProbe | None = None,
    cached: bool = False,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    normalization: Normalization | None = None,
    extract: ExtractSettings | None = None,
    json_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """The probe on ``encoder`` and on a random init of its shape (seeded by ``seed``), side by side.

    Both encoders are loaded at ``extract.img_size`` (default: the export's) on ``extract.device``
    and probed with the same settings. Returns ``{"pretrained": result, "random init": result,
    "gain": {metric: pretrained - random init}}``; prints the plan and the table when ``verbose``.
    """
    settings = settings or SegProbe()
    extract = extract or ExtractSettings(batch_size=settings.batch_size)

    def run(model, log):
        return seg_probe(
            model, train_source, val_source, settings=settings, cached=cached, extract=extract, log=log
        )

    out = pretrained_and_random_init(
        encoder, run, extract, checkpoint=checkpoint, seed=seed, normalization=normalization, verbose=verbose
    )
    a, b = out["pretrained"]["results"], out["random init"]["results"]
    out["gain"] = {k: a[k] - b[k] for k in ("miou", "miou_hungarian", "pixel_accuracy")}
    if json_path is not None:
        write_json(json_path, out)
    if verbose:
        print(format_seg_comparison(out), flush=True)
    return out


def format_seg_comparison(res: dict[str, Any]) -> str:
    """Side-by-side table of a :func:`compare_seg_probe` result, with the gain in points."""
    a, b = res["pretrained"], res["random init"]
    ra, rb = a["results"], b["results"]

    def row(label: str, x: float | None, y: float | None) -> list[Any]:
        if x is None or y is None:
            return [label, "-" if x is None else 100 * x, "-" if y is None else 100 * y, "-"]
        return [label, 100 * x, 100 * y, f"{100 * (x - y):+.2f}"]

    rows = [
        row("mIoU % (identity)", ra["miou"], rb["miou"]),
        row("mIoU % (Hungarian)", ra["miou_hungarian"], rb["miou_hungarian"]),
        row("pixel accuracy %", ra["pixel_accuracy"], rb["pixel_accuracy"]),
    ]
    rows += [row(f"  IoU % {n}", ra["per_class_iou"][n], rb["per_class_iou"][n]) for n in ra["per_class_iou"]]
    title = f"linear segmentation probe ({a['mode']}) of {a['encoder']['spec']} vs a random init"
    table = format_table(["", "pretrained", "random init", "gain (points)"], rows, title)
    seconds = f"{_seconds(a):.1f} s + {_seconds(b):.1f} s (random init)"
    return f"{table}\n{_footer(a, seconds)}"
