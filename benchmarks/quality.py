"""``python tools/benchmark.py quality RECIPE [section.key=value ...]``: trainer path vs plain loop.

A falling loss proves nothing about an encoder, so this benchmark judges training by what the
encoder is worth frozen. For every seed of ``--seeds`` the recipe's method is trained for the same
``--steps`` optimizer steps twice, from the same initial weights:

- **trainer path**: :func:`mimkit.train.trainer.pretrain` on the recipe (``train.max_steps=steps``,
  ``run.seed=seed``) in a temporary run directory; its exported encoder is scored;
- **plain loop**: :func:`train_plain`, a short loop over the training split decoded once into a uint8
  tensor (N, C, H, W): each epoch's order is the trainer's (``randperm`` seeded by ``seed + epoch``,
  last partial batch dropped), each batch is augmented on tensors by :func:`batched_augment`
  (random resized crop of area ``data.crop_scale`` and aspect 3/4-4/3, bicubic, then a horizontal
  flip), normalised with ``recipe.normalization`` and fed in micro-batches to the method built by
  :func:`mimkit.ssl.build_method` under the trainer's seeding, with ``torch.optim.AdamW`` over MAE's
  parameter groups, the trainer's per-step learning rate, gradient clipping when the recipe sets it,
  and no DeepSpeed.

Two options isolate the differences between the paths: ``--plain-augment trainer`` augments each
sample with :func:`mimkit.train.trainer.train_transform` under the trainer's per-sample seeds
(torchvision, uint8, per sample: then data order, augmentation, masks and initial weights are the
trainer's, and only the optimisation machinery differs), and ``--plain-token-decay`` decays the
cls and mask tokens, as the official MAE code does.

Every encoder (random init = the trainer's initial weights, plain loop, trainer path) is scored on
centre-cropped images of a labelled eval split with DINO's weighted k-NN (k = 20, T = 0.07) and a
linear probe (:func:`linear_probe`: multinomial logistic regression, full-batch L-BFGS on
standardised features, small L2), each on the cls token and on the mean patch token. The table
gives means over seeds; the gaps trainer - plain and plain - random come with their per-seed
values, mean, half range and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, Subset

ROWS = ("random_init", "plain_loop", "trainer_path")
ROW_NAMES = {"random_init": "random init", "plain_loop": "plain loop", "trainer_path": "trainer path"}
METRICS = ("knn_cls", "knn_mean", "linear_cls", "linear_mean", "loss")
METRIC_NAMES = {
    "knn_cls": "k-NN cls",
    "knn_mean": "k-NN mean",
    "linear_cls": "linear cls",
    "linear_mean": "linear mean",
    "loss": "final loss",
}
FEATURES = {"cls": "cls", "mean": "patch_mean"}
KNN_K = 20
KNN_TEMPERATURE = 0.07
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 500
AUGMENTS = ("batched", "trainer")


def _say(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- batched augmentation


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` random-resized-crop boxes ``(top, left, h, w)`` (int64, (n, 4)), torchvision's rule batched.

    Per box, up to 10 tries draw an area fraction uniformly in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; the first that fits the image is kept, at a uniform position. When none
    fits, the box is the whole image cut to the ratio range, centred (torchvision's fallback).
    """
    area = height * width
    target = torch.empty(n, CROP_ATTEMPTS).uniform_(scale[0], scale[1], generator=generator) * area
    log_ratio = torch.empty(n, CROP_ATTEMPTS).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round().long()
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none does)
    found = fits.any(dim=1)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    position = torch.rand(n, 2, generator=generator)
    top = (position[:, 0] * (height - h + 1)).floor().long().clamp(max=height - h)
    left = (position[:, 1] * (width - w + 1)).floor().long().clamp(max=width - w)

    fallback_h, fallback_w = height, width
    if width / height < ratio[0]:
        fallback_h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        fallback_w = int(round(height * ratio[1]))
    fallback = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w])
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(found[:, None], boxes, fallback)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Each float image (n, C, H, W) cropped to its box ``(top, left, h, w)``, resized to ``size``
    (bicubic, edge pixels repeated beyond the border) and, where ``flip`` is True, mirrored left-right.

    One ``grid_sample`` call: output pixel centres are mapped linearly onto the box (pixel-centre
    aligned, as ``F.interpolate(..., align_corners=False)``), so a whole-image box at the image's
    own size returns the image, and at another size equals ``F.interpolate`` bicubic.
    """
    n, channels, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    scale_x, scale_y = w / width, h / height
    shift_x, shift_y = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    zero = torch.zeros_like(scale_x)
    theta = torch.stack(
        [torch.stack([scale_x, zero, shift_x], dim=1), torch.stack([zero, scale_y, shift_y], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, [n, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def batched_augment(
    images: torch.Tensor,
    size: int,
    crop_scale: tuple[float, float],
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """uint8 images (n, C, H, W) -> random resized crops (bicubic) + flips (p = 0.5), normalised floats."""
    n, _, height, width = images.shape
    boxes = sample_crop_boxes(n, height, width, crop_scale, generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = crop_resize(images.float() / 255.0, boxes, size, flip).clamp_(0.0, 1.0)
    return (out - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- the plain loop


def decode_split(uri: str, split: str, channels: int) -> torch.Tensor:
    """Every image of ``uri``'s ``split`` as one uint8 tensor (N, C, H, W) with ``channels`` channels."""
    from torchvision.transforms import v2

    from mimkit.data import build_source
    from mimkit.data.transforms import ToChannels

    dataset = build_source(uri, split, v2.Compose([ToChannels(channels)]))
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"the plain loop decodes a map-style source once (synthetic:, folder:); {uri!r} is a stream"
        )
    images = []
    for i in range(len(dataset)):
        image = dataset[i]["image"]  # float in [0, 1], exactly v / 255 of the uint8 image
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"the plain loop stacks the images of {uri!r} ({split}) into one tensor, but image {i} is "
                f"{tuple(image.shape)} and image 0 is {tuple(images[0].shape)}; give a source of one size"
            )
        images.append(image.mul(255).round_().to(torch.uint8))
    return torch.stack(images)


def plain_param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """MAE's AdamW groups: no decay for 1-D parameters and names ending in ``no_decay``; frozen ones out."""
    decay, skip = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (skip if param.ndim <= 1 or name.endswith(tuple(no_decay)) else decay).append(param)
    return [{"params": skip, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def initial_method(recipe, seed: int) -> nn.Module:
    """The method with the trainer's initial weights for ``seed``; the global RNG left as the trainer's."""
    from mimkit.ssl import build_method
    from mimkit.train.trainer import seed_everything

    seed_everything(seed)  # as build_engine: identical initial weights
    method = build_method(recipe.method.to_dict())
    seed_everything(seed)  # as build_engine (rank 0): the stream the masks are drawn from
    return method


def final_window(steps: int, log_every: int) -> int:
    """How many steps the trainer's last logged loss averages (it logs every ``log_every`` and at the end)."""
    return steps % log_every or log_every


def train_plain(
    recipe,
    seed: int,
    steps: int,
    images: torch.Tensor,
    augment: str = "batched",
    token_decay: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``recipe``'s method ``steps`` steps on pre-decoded uint8 ``images`` (see the module docstring).

    Returns ``{"encoder", "losses" (per step), "first_loss", "final_loss", "wall_s"}``.
    """
    from torchvision import tv_tensors
    from tqdm import tqdm

    from mimkit.train.loader import sample_seed
    from mimkit.train.schedule import warmup_cosine_lr
    from mimkit.train.trainer import train_transform

    start = time.perf_counter()
    o, batch, micro = recipe.optim, recipe.batch.global_size, recipe.batch.micro_size
    method = initial_method(recipe, seed).train()
    no_decay = [s for s in o.no_decay if not (token_decay and s.endswith("_token"))]
    optimizer = torch.optim.AdamW(
        plain_param_groups(method, o.weight_decay, no_decay), lr=recipe.lr, betas=tuple(o.betas), eps=o.eps
    )
    norm = recipe.normalization
    mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
    transform = train_transform(recipe) if augment == "trainer" else None
    crops = torch.Generator().manual_seed(seed)  # the batched crops' own stream, apart from the masks'
    steps_per_epoch = len(images) // batch

    def augmented(indices: torch.Tensor, epoch: int) -> torch.Tensor:
        if transform is None:
            return batched_augment(images[indices], recipe.img_size, recipe.data.crop_scale, mean, std, crops)
        out = []
        for i in indices.tolist():  # the trainer's per-sample transform under its per-sample seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(seed, epoch, i))
                sample = transform({"image": tv_tensors.Image(images[i])})
            out.append(sample["image"].as_subclass(torch.Tensor))
        return torch.stack(out)

    losses: list[float] = []
    bar = tqdm(total=steps, desc=f"plain loop seed {seed}", unit="step", disable=not progress, leave=False)
    for step in range(steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if in_epoch == 0 or step == 0:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
        inputs = augmented(order[in_epoch * batch : (in_epoch + 1) * batch], epoch)
        lr = warmup_cosine_lr(
            step, steps_per_epoch, recipe.lr, recipe.train.epochs, o.warmup_epochs, o.min_lr
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for chunk in inputs.split(micro):
            loss = method({"image": chunk})["loss"] * (len(chunk) / len(inputs))
            loss.backward()
            loss_sum += float(loss.detach())
        if o.clip_grad:
            nn.utils.clip_grad_norm_(method.parameters(), o.clip_grad)
        optimizer.step()
        if not math.isfinite(loss_sum):
            raise ValueError(f"plain loop: the loss is {loss_sum} at step {step + 1} (seed {seed})")
        losses.append(loss_sum)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", refresh=False)
    bar.close()
    encoder = method.encoder.eval().requires_grad_(False)
    encoder.normalization = norm.to_dict()
    window = final_window(steps, recipe.run.log_every)
    return {
        "encoder": encoder,
        "losses": losses,
        "first_loss": losses[0],
        "final_loss": sum(losses[-window:]) / window,
        "wall_s": time.perf_counter() - start,
    }


def train_trainer_path(recipe, seed: int, steps: int, progress: bool = True) -> dict[str, Any]:
    """``pretrain`` on ``recipe`` for ``steps`` steps in a temporary run directory; its exported encoder."""
    from mimkit.eval.features import load_encoder
    from mimkit.train.config import from_dict
    from mimkit.train.trainer import METRICS_FILE, pretrain

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mimkit-quality-") as tmp:
        raw = recipe.to_dict()
        raw["train"]["max_steps"] = steps
        raw["run"].update(seed=seed, dir=str(Path(tmp) / "run"), progress=progress, checkpoint_every=0)
        # the plain loop has no monitor or pictures: equal work and equal random streams
        raw["run"].update(monitor=None, images_every=0, loggers=[])
        with contextlib.redirect_stdout(io.StringIO()):  # the run's summary; the table is ours
            result = pretrain(from_dict(raw, world_size=1))
        if result.steps != steps:
            raise ValueError(f"the trainer path stopped after {result.steps} steps, not {steps}")
        encoder = load_encoder(result.run_dir)
        metrics = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    return {
        "encoder": encoder,
        "loss_curve": [[m["step"], m["loss"]] for m in metrics],
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "wall_s": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- scoring


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2: float = PROBE_L2,
    iterations: int = PROBE_ITERATIONS,
) -> float:
    """Top-1 % of multinomial logistic regression on standardised features (full-batch L-BFGS, float64).

    Minimises ``mean cross-entropy + l2 / 2 * |W|^2`` from zero weights; the L2 makes the optimum
    unique, so the result depends on the features only (deterministic on a CPU).
    """
    x = train_x.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x, v = (x - mu) / sd, (val_x.double() - mu) / sd
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=iterations,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )
    labels = train_y.long()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    with torch.no_grad():
        pred = (v @ weight + bias).argmax(1)
    return 100.0 * float((pred == val_y.long()).float().mean())


def score(train: dict, val: dict, num_classes: int, l2: float) -> dict[str, float]:
    """k-NN (k = 20, T = 0.07) and the linear probe, each on the cls token and the mean patch token."""
    from mimkit.eval.knn import knn_top1

    out = {}
    for short, key in FEATURES.items():
        knn = knn_top1(
            train[key],
            train["label"],
            val[key],
            val["label"],
            ks=[KNN_K],
            temperature=KNN_TEMPERATURE,
            num_classes=num_classes,
        )
        out[f"knn_{short}"] = knn[KNN_K]
        out[f"linear_{short}"] = linear_probe(
            train[key], train["label"], val[key], val["label"], num_classes, l2
        )
    return out


def eval_dataset(uri: str, split: str, img_size: int, norm, cap: int | None):
    """A labelled eval split under the evaluation transform, cut to ``cap`` images spread over it."""
    from mimkit.data import build_source, build_transform
    from mimkit.eval.features import require_labels

    dataset = build_source(uri, split, build_transform("eval", img_size, norm))
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"eval source {uri!r} is a stream; give a map-style labelled source")
    require_labels(dataset, uri, split)
    if cap is not None and cap < len(dataset):  # a seeded draw, so a folder's class order is no bias
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:cap]
        dataset = Subset(dataset, sorted(picks.tolist()))
    return dataset


@torch.no_grad()
def features(
    encoders: dict[str, nn.Module], dataset, batch_size: int, progress: bool, desc: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Per encoder, the final-normed cls token and mean patch token of every image, and the labels.

    All encoders read each batch once it is decoded (the features of mimkit.eval.features).
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    parts: dict[str, dict[str, list[torch.Tensor]]] = {
        name: {"cls": [], "patch_mean": []} for name in encoders
    }
    labels = []
    for batch in tqdm(
        DataLoader(dataset, batch_size=batch_size), desc=desc, disable=not progress, leave=False
    ):
        for name, encoder in encoders.items():
            tokens = encoder.eval().forward_features(batch["image"])
            parts[name]["cls"].append(tokens[:, 0].float())
            parts[name]["patch_mean"].append(tokens[:, encoder.num_prefix_tokens :].float().mean(1))
        labels.append(batch["label"].long())
    label = torch.cat(labels)
    return {name: {k: torch.cat(v) for k, v in p.items()} | {"label": label} for name, p in parts.items()}


def spread(values: list[float]) -> dict[str, Any]:
    """Per-seed values, their mean, half their range and their standard deviation (ddof 1; 0 for one)."""
    return {
        "per_seed": values,
        "mean": statistics.fmean(values),
        "half_range": (max(values) - min(values)) / 2,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def weight_distance(a: nn.Module, b: nn.Module) -> dict[str, float]:
    """Max absolute and L2 difference between two encoders' state dicts (same keys)."""
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [(sa[k].float() - sb[k].float()).flatten() for k in sa]
    flat = torch.cat(diffs)
    return {"max_abs": float(flat.abs().max()), "l2": float(flat.norm())}


# ----------------------------------------------------------------------------- the benchmark


def plan(args: argparse.Namespace):
    """Load and check everything before any training; returns ``(recipe, info)`` or raises a ValueError."""
    from mimkit.data import build_source
    from mimkit.data.transforms import Normalization
    from mimkit.train import load_recipe
    from mimkit.train.config import RecipeError
    from mimkit.train.trainer import resolve_auto_stats

    if args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be a positive number of optimizer steps")
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {args.seeds} must be distinct integers >= 0")
    if args.eval_images is not None and args.eval_images < KNN_K:
        raise ValueError(f"--eval-images={args.eval_images} must be at least k={KNN_K} (the k-NN bank)")
    if args.probe_l2 <= 0:
        raise ValueError(f"--probe-l2={args.probe_l2} must be positive")
    if args.plain_augment not in AUGMENTS:
        raise ValueError(f"--plain-augment={args.plain_augment!r}; valid: {', '.join(AUGMENTS)}")
    try:
        recipe = load_recipe(args.recipe, list(args.overrides))
    except RecipeError as err:
        raise ValueError(f"recipe: {err}") from None
    d, batch = recipe.data, recipe.batch.global_size
    if args.plain_augment == "batched" and d.transform != "pretrain":
        raise ValueError(
            f"data.transform={d.transform!r}: the batched plain-loop augmentation implements the pretrain "
            "transform only; use --plain-augment trainer"
        )
    dataset = build_source(d.source, d.split)
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"data.source {d.source!r} is a stream; the plain loop needs a map-style source")
    if len(dataset) < batch:
        raise ValueError(
            f"data.source {d.source!r} ({d.split}) holds {len(dataset)} images, fewer than one batch "
            f"(batch.global_size={batch})"
        )
    steps_per_epoch = len(dataset) // batch
    schedule = recipe.train.epochs * steps_per_epoch
    if args.steps > schedule:
        raise ValueError(
            f"--steps={args.steps} exceeds the recipe's whole schedule (train.epochs={recipe.train.epochs} "
            f"x {steps_per_epoch} steps per epoch = {schedule}); lower --steps or raise train.epochs"
        )
    eval_train = args.eval_train or d.source
    eval_val = args.eval_val or eval_train
    # auto stats are measured below, once checks pass; these datasets only check labels and sizes
    norm = Normalization.imagenet(recipe.channels) if "auto" in (d.mean, d.std) else recipe.normalization
    sets = {}
    for split, uri in (("train", eval_train), ("val", eval_val)):
        sets[split] = eval_dataset(uri, split, recipe.img_size, norm, args.eval_images)
    if len(sets["train"]) < KNN_K:
        raise ValueError(
            f"eval source {eval_train!r} (train) holds {len(sets['train'])} images, fewer than k={KNN_K}"
        )
    if recipe.train.precision != "fp32":
        _say(f"train.precision={recipe.train.precision}: the trainer path runs it, the plain loop runs fp32")
    recipe = resolve_auto_stats(recipe, verbose=True)  # once, for every run
    info = {
        "train_images": len(dataset),
        "steps_per_epoch": steps_per_epoch,
        "schedule_steps": schedule,
        "eval_train": eval_train,
        "eval_val": eval_val,
    }
    return recipe, info


def code_state() -> dict[str, Any]:
    """The checkout measured: HEAD and the files changed in the work tree (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return {"git_head": None, "changed_files": None}
    return {
        "git_head": head.stdout.strip(),
        "changed_files": [line[3:] for line in dirty.stdout.splitlines()],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``quality``: train, score, print the table and gaps; the result dict (see the module docstring)."""
    from benchmarks.common import machine_info
    from mimkit.eval.features import encoder_digest

    start = time.perf_counter()
    machine, code = machine_info(), code_state()
    progress = not args.no_progress
    recipe, info = plan(args)
    paths = set(args.paths)
    images = None
    if "plain" in paths:
        _say(f"decoding {recipe.data.source} ({recipe.data.split}) once for the plain loop")
        images = decode_split(recipe.data.source, recipe.data.split, recipe.channels)

    encoders: dict[str, dict[str, nn.Module]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        key = str(seed)
        encoders[key] = {"random_init": initial_method(recipe, seed).encoder.eval().requires_grad_(False)}
        encoders[key]["random_init"].normalization = recipe.normalization.to_dict()
        runs[key] = {}
        if "plain" in paths:
            _say(f"seed {seed}: plain loop, {args.steps} steps ({args.plain_augment} augmentation)")
            out = train_plain(
                recipe, seed, args.steps, images, args.plain_augment, args.plain_token_decay, progress
            )
            encoders[key]["plain_loop"] = out.pop("encoder")
            every = recipe.run.log_every
            marks = sorted({*range(every, args.steps + 1, every), args.steps})
            curve = [[s, sum(out["losses"][p:s]) / (s - p)] for p, s in zip([0, *marks], marks)]
            runs[key]["plain_loop"] = {**{k: out[k] for k in ("first_loss", "final_loss", "wall_s")}}
            runs[key]["plain_loop"]["loss_curve"] = curve
            _say(f"seed {seed}: plain loop done in {out['wall_s']:.0f} s, loss {out['final_loss']:.4f}")
        if "trainer" in paths:
            _say(f"seed {seed}: trainer path, {args.steps} steps")
            out = train_trainer_path(recipe, seed, args.steps, progress)
            encoders[key]["trainer_path"] = out.pop("encoder")
            runs[key]["trainer_path"] = out
            _say(f"seed {seed}: trainer path done in {out['wall_s']:.0f} s, loss {out['final_loss']:.4f}")

    _say("scoring: features of the eval splits, k-NN and linear probes")
    t_eval = time.perf_counter()
    norm = recipe.normalization
    sets = {
        split: eval_dataset(uri, split, recipe.img_size, norm, args.eval_images)
        for split, uri in (("train", info["eval_train"]), ("val", info["eval_val"]))
    }
    flat = {f"{seed}/{row}": enc for seed, by_row in encoders.items() for row, enc in by_row.items()}
    feats = {
        split: features(flat, ds, args.batch_size, progress, f"features {split}")
        for split, ds in sets.items()
    }
    any_name = next(iter(flat))
    labels = [feats[s][any_name]["label"] for s in ("train", "val")]
    num_classes = int(max(int(t.max()) for t in labels)) + 1

    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    for seed, by_row in encoders.items():
        per_seed[seed] = {}
        for row, enc in by_row.items():
            name = f"{seed}/{row}"
            numbers = score(feats["train"][name], feats["val"][name], num_classes, args.probe_l2)
            if row == "random_init":  # the initial weights' loss: the first step's, on the first batch
                first = runs[seed].get("plain_loop", runs[seed].get("trainer_path"))
                numbers["loss"] = first["first_loss"]
            else:
                numbers["loss"] = runs[seed][row]["final_loss"]
            per_seed[seed][row] = {**numbers, **runs[seed].get(row, {}), "sha256": encoder_digest(enc)[:16]}
        init = by_row["random_init"]
        distances = {
            f"{row}_vs_random_init": weight_distance(enc, init)
            for row, enc in by_row.items()
            if row != "random_init"
        }
        if "plain_loop" in by_row and "trainer_path" in by_row:
            distances["trainer_path_vs_plain_loop"] = weight_distance(
                by_row["trainer_path"], by_row["plain_loop"]
            )
        per_seed[seed]["weight_distance"] = distances
    eval_s = time.perf_counter() - t_eval

    rows = [r for r in ROWS if all(r in per_seed[s] for s in per_seed)]
    means = {row: {m: spread([per_seed[s][row][m] for s in per_seed]) for m in METRICS} for row in rows}
    gaps = {}
    for name, (a, b) in {"trainer_minus_plain": ("trainer_path", "plain_loop"),
                         "plain_minus_random": ("plain_loop", "random_init"),
                         "trainer_minus_random": ("trainer_path", "random_init")}.items():  # fmt: skip
        if a in rows and b in rows:
            gaps[name] = {
                m: spread([per_seed[s][a][m] - per_seed[s][b][m] for s in per_seed]) for m in METRICS
            }
    result = {
        "benchmark": "quality",
        "recipe": str(args.recipe),
        "overrides": list(args.overrides),
        "recipe_resolved": recipe.to_dict(),
        "normalization": norm.to_dict(),
        "channels": recipe.channels,
        "steps": args.steps,
        "seeds": list(args.seeds),
        "per_seed_overrides": {"train.max_steps": args.steps, "run.seed": "each of seeds"},
        "options": {
            "paths": sorted(paths),
            "plain_augment": args.plain_augment,
            "plain_token_decay": args.plain_token_decay,
            "plain_precision": "fp32",
            "eval_images": args.eval_images,
            "probe_l2": args.probe_l2,
            "probe": f"multinomial logistic regression, L-BFGS ({PROBE_ITERATIONS} iterations max, "
            "strong Wolfe), standardised features, float64",
            "knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE, "weights": "exp(cosine / T)"},
            "features": "after the final norm: cls token, mean of the patch tokens",
            "batch_size": args.batch_size,
        },
        "train_data": {
            "source": recipe.data.source,
            "split": recipe.data.split,
            "images": info["train_images"],
            "global_batch": recipe.batch.global_size,
            "micro_batch": recipe.batch.micro_size,
            "steps_per_epoch": info["steps_per_epoch"],
            "schedule_steps": info["schedule_steps"],
            "img_size": recipe.img_size,
        },
        "eval": {
            "train": info["eval_train"],
            "val": info["eval_val"],
            "num_train": len(sets["train"]),
            "num_val": len(sets["val"]),
            "num_classes": num_classes,
            "img_size": recipe.img_size,
            "transform": "eval: resize the shorter side to img_size / 0.875 (bicubic), centre crop",
        },
        "machine": machine,
        "code": code,
        "per_seed": per_seed,
        "means": means,
        "gaps": gaps,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - start,
        "notes": "random init = the trainer's initial weights (same seed, no steps); its loss is the first "
        "step's loss (initial weights, first batch). final loss = the mean over the trainer's last logged "
        "window (run.log_every). Accuracies in %, gaps in points.",
    }
    print(format_result(result))
    return result


def _cell(s: dict[str, Any], digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} ± {s['half_range']:.{digits}f}"


def format_result(res: dict[str, Any]) -> str:
    """The table (means ± half range over seeds) and the gaps with their per-seed values."""
    e, t = res["eval"], res["train_data"]
    lines = [
        f"quality: {res['recipe']} {' '.join(res['overrides'])}".rstrip(),
        f"  {res['steps']} steps x {t['global_batch']} images of {t['source']} ({t['images']} images), "
        f"seeds {res['seeds']}, plain augment {res['options']['plain_augment']}, token decay "
        f"{res['options']['plain_token_decay']}",
        f"  eval: train {e['num_train']} / val {e['num_val']} images, {e['num_classes']} classes, "
        f"{e['img_size']} px, channels {res['channels']}, normalisation {res['normalization']}",
        "",
    ]
    header = ["", *(METRIC_NAMES[m] for m in METRICS)]
    table = [header]
    for row, by_metric in res["means"].items():
        table.append([ROW_NAMES[row], *(_cell(by_metric[m], 4 if m == "loss" else 2) for m in METRICS)])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    lines += ["", "gaps (points; loss in loss units): mean ± half range over seeds [per seed]"]
    for name, by_metric in res["gaps"].items():
        cells = []
        for m in METRICS:
            s = by_metric[m]
            digits = 4 if m == "loss" else 2
            per = ", ".join(f"{v:+.{digits}f}" for v in s["per_seed"])
            cells.append(f"{METRIC_NAMES[m]} {s['mean']:+.{digits}f} ± {s['half_range']:.{digits}f} [{per}]")
        lines.append(f"  {name.replace('_', ' ')}: " + "; ".join(cells))
    lines.append(f"  ({res['wall_s']:.0f} s in all, {res['eval_s']:.0f} s scoring)")
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The ``quality`` options."""
    parser.add_argument("recipe", help="a pretraining recipe, e.g. recipes/demo/mae_vit_tiny.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="recipe overrides, right after the recipe"
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run seeds (default 0 1)")
    parser.add_argument(
        "--plain-augment",
        choices=AUGMENTS,
        default="batched",
        help="plain loop augmentation: batched crops on tensors (default) or the trainer's per-sample one",
    )
    parser.add_argument(
        "--plain-token-decay", action="store_true", help="plain loop decays cls/mask tokens (official MAE)"
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=("plain", "trainer"),
        default=["plain", "trainer"],
        help="which of the two to train (default both; the random init is always scored)",
    )
    parser.add_argument("--eval-train", help="labelled source whose train split is the bank / probe set")
    parser.add_argument(
        "--eval-val", help="labelled source whose val split is scored (default: --eval-train)"
    )
    parser.add_argument("--eval-images", type=int, help="cap both eval splits at this many images")
    parser.add_argument("--probe-l2", type=float, default=PROBE_L2, help=f"probe L2 (default {PROBE_L2})")
    parser.add_argument("--batch-size", type=int, default=256, help="feature extraction batch (default 256)")
