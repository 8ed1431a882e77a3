"""Linear probes on a frozen encoder: MAE's protocol (``mae``) and DINOv2's head grid (``grid``).

``mae`` (He et al. 2022, ``main_linprobe.py`` and FINETUNE.md): the final-normed cls token goes
through ``BatchNorm1d(affine=False, eps=1e-6)`` and a linear layer (weight truncated normal std 0.01,
bias 0); only the linear layer learns, with LARS (momentum 0.9, trust 0.001, no weight decay) at
``lr = 0.1 x effective batch / 256``, a linear warm-up over 10 epochs then a half cosine to 0 at
epoch 90, set every optimiser step at the fractional epoch. The effective batch (16384) is reached
by gradient accumulation over forward passes of ``batch_size`` images; the BatchNorm runs in
train mode while training, so its statistics are those of one forward pass (MAE: one GPU's 512).
Training images get MAE's RandomResizedCrop (one draw, no retry loop, bicubic) and a flip.
The reported top-1 is the last epoch's; the maximum over epochs, which MAE also prints, is
selected on the test split and reported only as such.

``grid`` (Oquab et al. 2023, ``dinov2/eval/linear.py``): one frozen forward pass per batch feeds
every head of the grid n_last_blocks in {1, 4} x avgpool in {no, yes} x 13 learning rates in
[1e-5, 0.1] x (DINOv2's plain linear head, MAE's BN-without-affine + linear): 104 heads. A head's
input is the concatenation of the cls tokens of the last n blocks (oldest first) and, with
avgpool, the mean of the last block's patch tokens. Heads are ``Linear`` with weight N(0, 0.01)
and bias 0, trained together on the sum of their cross-entropies by SGD (momentum 0.9, no weight
decay) at ``lr = base lr x batch / 256``, cosine-annealed to 0 over ``epochs x epoch_length``
iterations (10 x 1250 at batch 1024). Training images get RandomResizedCrop (bicubic) and a flip.
Unlike DINOv2, which selects on the reported split, the best head is chosen on a stratified
validation split carved from the training set (10% of each class, seeded), never on the test
split (ties: the lower validation loss); the selected head's test top-1 is the result, and the
whole grid is reported.

``cached=True`` trains either probe on features extracted once from centre crops (no
augmentation): much faster, a different protocol, and labelled ``cached`` in every output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from mimkit.data import build_source, build_transform
from mimkit.eval.common import data_info, format_table, one_thread_on_cpu, result
from mimkit.eval.features import (
    classification_source,
    describe_encoder,
    extract_features,
    input_normalization,
    num_classes_of,
    require_labelled_source,
    require_labels,
    source_features,
    split_labels,
)
from mimkit.eval.heads import LinearHead, head_input, score_head, top1
from mimkit.eval.lars import LARS
from mimkit.eval.probe_data import (
    FEATURES,
    Batches,
    SampleOrder,
    augmented_batches,
    cached_batches,
    probe_train_transform,
)
from mimkit.eval.settings import ExtractSettings
from mimkit.models import Backbone

PRESETS = ("mae", "grid")
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@dataclass(frozen=True)
class MaeProbe:
    """MAE's linear-probe settings; every field defaults to the paper's value."""

    epochs: int = 90
    warmup_epochs: float | None = None  # None: epochs * 10 / 90 (MAE: 10 of 90)
    effective_batch: int = 16384  # images per optimiser step, reached by accumulation
    batch_size: int = 512  # images per forward pass and per BatchNorm statistic (MAE: 512 per GPU)
    blr: float = 0.1  # lr = blr * effective_batch / 256
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    seed: int = 0


@dataclass(frozen=True)
class GridProbe:
    """DINOv2's linear-head grid settings (plus the BN variant and the carved validation split)."""

    epochs: int = 10
    epoch_length: int = 1250  # iterations per epoch (DINOv2); 0: one pass over the training images
    batch_size: int = 1024  # DINOv2's global batch; every head's lr = base lr * batch_size / 256
    base_lrs: tuple[float, ...] = DINOV2_LRS
    n_last_blocks: tuple[int, ...] = (1, 4)
    avgpool: tuple[bool, ...] = (False, True)
    batchnorm: tuple[bool, ...] = (False, True)  # BatchNorm1d(affine=False) before the linear layer
    val_fraction: float = 0.1  # of each training class, held out to select the head
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


def preset_settings(preset: str, **overrides: Any) -> MaeProbe | GridProbe:
    """The settings of ``preset`` with ``overrides`` (None values keep the preset's default)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown linear-probe preset {preset!r}; valid: {', '.join(PRESETS)}")
    cls = MaeProbe if preset == "mae" else GridProbe
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown {preset} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def grid_heads(settings: GridProbe) -> list[dict]:
    """Every head of the grid, in reporting order: name, n_last_blocks, avgpool, batchnorm, base_lr."""
    heads = []
    for bn in settings.batchnorm:
        for n in settings.n_last_blocks:
            for avg in settings.avgpool:
                for lr in settings.base_lrs:
                    name = f"blocks{n}{'_avgpool' if avg else ''}{'_bn' if bn else ''}_lr{lr:g}"
                    heads.append(dict(name=name, n_last_blocks=n, avgpool=avg, batchnorm=bn, base_lr=lr))
    return heads


def _as_features(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept feature dicts with ``cls`` only (custom extractors, tests): fill the other keys from it."""
    out = dict(feats)
    out.setdefault("last_cls", out["cls"][:, None])
    out.setdefault("patch_mean", out["cls"])
    return out


# ----------------------------------------------------------------------------- mae


def mae_plan(settings: MaeProbe, num_train: int) -> dict[str, Any]:
    """Derived MAE settings: warm-up, accumulation, lr, steps; a bad value is an error naming it."""
    s = settings
    if s.epochs < 1:
        raise ValueError(f"epochs={s.epochs} must be at least 1")
    warmup = s.epochs * 10 / 90 if s.warmup_epochs is None else float(s.warmup_epochs)
    if not 0 <= warmup < s.epochs:
        raise ValueError(f"warmup_epochs={warmup:g} must be in [0, epochs={s.epochs})")
    if s.batch_size < 1 or s.effective_batch < 1:
        raise ValueError(
            f"batch_size={s.batch_size} and effective_batch={s.effective_batch} must be positive"
        )
    micro = min(s.batch_size, s.effective_batch)
    if s.effective_batch % micro:
        lower, upper = s.effective_batch // micro * micro, -(-s.effective_batch // micro) * micro
        raise ValueError(
            f"effective_batch={s.effective_batch} is not a multiple of the forward-pass batch_size={micro}; "
            f"the nearest valid are {lower} and {upper} (--effective-batch), or change --batch-size"
        )
    steps = num_train // s.effective_batch
    if steps == 0:
        # The largest effective batch one step fits in: a multiple of the forward-pass batch, or
        # the whole split where it is smaller than one forward pass.
        largest = num_train // s.batch_size * s.batch_size if num_train >= s.batch_size else num_train
        raise ValueError(
            f"the training split has {num_train} images, fewer than effective_batch={s.effective_batch} "
            f"(MAE: 16384); the largest valid effective batch here is {largest} (a multiple of the "
            f"forward-pass batch_size={min(s.batch_size, largest)}): pass --effective-batch {largest} "
            "or smaller"
        )
    return {
        "warmup_epochs": warmup,
        "batch_size": micro,
        "accum_steps": s.effective_batch // micro,
        "effective_batch": s.effective_batch,
        "lr": s.blr * s.effective_batch / 256,
        "steps_per_epoch": steps,
        "total_steps": steps * s.epochs,
    }


def mae_lr(epoch: float, lr: float, warmup: float, epochs: int, min_lr: float = 0.0) -> float:
    """MAE's ``adjust_learning_rate`` at a fractional epoch: linear warm-up, then a half cosine."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def run_mae_probe(
    batches: Batches,
    num_train: int,
    test: dict[str, torch.Tensor],
    num_classes: int,
    settings: MaeProbe | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """MAE's probe on any batch source; ``test`` holds precomputed ``cls`` and ``label``.

    Returns ``top1`` (last epoch, %), ``top1_per_epoch``, ``max_top1_over_epochs`` (selected on
    the test split: information, not a result), ``train_loss_per_epoch``, ``plan`` and ``head``.
    """
    settings = settings or MaeProbe()
    device = torch.device(device)
    plan = mae_plan(settings, num_train)
    steps, accum = plan["steps_per_epoch"], plan["accum_steps"]
    order = SampleOrder(num_train, steps * settings.effective_batch, settings.epochs, settings.seed)
    per_epoch, losses = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = LinearHead(test["cls"].shape[1], num_classes, batchnorm=True, init="trunc_normal").to(device)
        opt = LARS(
            head.parameters(),
            weight_decay=settings.weight_decay,
            momentum=settings.momentum,
            trust_coefficient=settings.trust_coefficient,
        )
        stream = batches(order, plan["batch_size"])
        bar = tqdm(total=plan["total_steps"], desc="linear probe (mae)", disable=not progress, leave=False)
        for epoch in range(settings.epochs):
            head.train()  # MAE trains with the BatchNorm on batch statistics
            loss_sum = 0.0
            for step in range(steps):
                lr = mae_lr(
                    epoch + step / steps, plan["lr"], plan["warmup_epochs"], settings.epochs, settings.min_lr
                )
                for group in opt.param_groups:
                    group["lr"] = lr
                for _ in range(accum):
                    feats, labels = next(stream)
                    loss = F.cross_entropy(head(feats["cls"]), labels) / accum
                    loss.backward()
                    loss_sum += loss.item()
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.update()
            losses.append(loss_sum / steps)
            per_epoch.append(top1(head, test["cls"], test["label"]))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", top1=f"{per_epoch[-1]:.1f}")
        bar.close()
    return {
        "top1": per_epoch[-1],
        "top1_per_epoch": per_epoch,
        "max_top1_over_epochs": max(per_epoch),
        "train_loss_per_epoch": losses,
        "plan": plan,
        "head": head.cpu(),
    }


def train_mae_probe(
    train: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor],
    num_classes: int,
    settings: MaeProbe | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """MAE's probe on precomputed features: ``cls`` (N, D) and ``label`` (N,) in ``train`` and ``test``."""
    train = _as_features(train)
    with one_thread_on_cpu(torch.device(device)):
        return run_mae_probe(
            cached_batches(train, device),
            len(train["label"]),
            test,
            num_classes,
            settings,
            device=device,
            progress=progress,
        )


# ----------------------------------------------------------------------------- grid


def carve_val(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of training indices into (fit, selection): ``round(fraction x count)`` per class.

    A class with at least two samples gives at least one to the selection split and keeps one.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction={fraction} must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held.append(members[:n])
        fit.append(members[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def grid_plan(
    settings: GridProbe, labels: torch.Tensor, depth: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The carved split and the iteration count of ``settings`` on ``labels``, checked against an
    encoder of ``depth`` blocks: ``(fit, held, iterations)``; a bad value is an error naming it."""
    for n in settings.n_last_blocks:
        if not 1 <= n <= depth:
            raise ValueError(f"n_last_blocks={n} needs the last {n} blocks; the encoder has {depth}")
    fit, held = carve_val(labels, settings.val_fraction, settings.seed)
    return fit, held, grid_iterations(settings, len(fit))


def grid_iterations(settings: GridProbe, num_fit: int) -> int:
    """``epochs x epoch_length`` iterations; ``epoch_length=0`` means one pass over ``num_fit`` images."""
    if settings.epochs < 1 or settings.epoch_length < 0 or settings.batch_size < 1:
        raise ValueError(
            f"epochs={settings.epochs} and batch_size={settings.batch_size} must be positive and "
            f"epoch_length={settings.epoch_length} non-negative (0 = one pass over the data)"
        )
    return settings.epochs * (settings.epoch_length or max(num_fit // settings.batch_size, 1))


def run_grid_probe(
    batches: Batches,
    train_labels: torch.Tensor,
    selection_features: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    test: dict[str, torch.Tensor],
    num_classes: int,
    settings: GridProbe | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """The head grid on any batch source.

    Args:
        batches: training batches by index into the training set.
        train_labels: (N,) labels of the whole training set, to carve the selection split.
        selection_features: held-out training indices -> their (centre-crop) features.
        test: precomputed ``last_cls``, ``patch_mean`` and ``label`` of the test split, only scored.

    Returns ``top1`` (the selected head's test top-1), ``best``, ``grid`` (every head: settings,
    val top-1 and loss, test top-1) and ``plan``. Selection reads the carved split only: the best
    val top-1, ties broken by the lower val loss (then by grid order).
    """
    settings = settings or GridProbe()
    device = torch.device(device)
    test = _as_features(test)
    dim, depth = test["cls"].shape[1], test["last_cls"].shape[1]
    fit, held, iterations = grid_plan(settings, train_labels, depth)
    total = iterations * settings.batch_size
    order = SampleOrder(len(fit), len(fit), -(-total // len(fit)), settings.seed, total=total, index=fit)
    spec = grid_heads(settings)
    inputs = sorted({(h["n_last_blocks"], h["avgpool"]) for h in spec})
    scale = settings.batch_size / 256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        heads = nn.ModuleList(
            LinearHead(dim * (h["n_last_blocks"] + h["avgpool"]), num_classes, h["batchnorm"]) for h in spec
        ).to(device)
        peak = [h["base_lr"] * scale for h in spec]
        opt = torch.optim.SGD(
            [{"params": head.parameters(), "lr": lr} for head, lr in zip(heads, peak)],
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        heads.train()
        stream = batches(order, settings.batch_size)
        for it in tqdm(range(iterations), desc="linear probe (grid)", disable=not progress, leave=False):
            # torch's CosineAnnealingLR to 0, stepped every iteration
            factor = 0.5 * (1.0 + math.cos(math.pi * it / iterations))
            for group, lr in zip(opt.param_groups, peak):
                group["lr"] = lr * factor
            feats, labels = next(stream)
            x = {key: head_input(feats, *key) for key in inputs}
            loss = sum(
                F.cross_entropy(head(x[h["n_last_blocks"], h["avgpool"]]), labels)
                for head, h in zip(heads, spec)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    val = _as_features(selection_features(held))
    grid = []
    for head, h, lr in zip(heads, spec, peak):
        key = (h["n_last_blocks"], h["avgpool"])
        grid.append(
            {
                **h,
                "lr": lr,
                **dict(zip(("val_top1", "val_loss"), score_head(head, head_input(val, *key), val["label"]))),
                "test_top1": top1(head, head_input(test, *key), test["label"]),
            }
        )
    # The carved split alone picks the head: best top-1, ties broken by the lower loss, then grid order.
    best = max(range(len(grid)), key=lambda i: (grid[i]["val_top1"], -grid[i]["val_loss"], -i))
    plan = {"iterations": iterations, "num_heads": len(spec), "num_fit": len(fit), "num_selection": len(held)}
    return {"top1": grid[best]["test_top1"], "best": grid[best], "grid": grid, "plan": plan}


def train_grid_probe(
    train: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor],
    num_classes: int,
    settings: GridProbe | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """The head grid on precomputed features (``last_cls`` (N, n, D), ``patch_mean`` (N, D), ``label``)."""
    train = _as_features(train)
    with one_thread_on_cpu(torch.device(device)):
        return run_grid_probe(
            cached_batches(train, device),
            train["label"],
            lambda held: {k: train[k][held] for k in (*FEATURES, "label")},
            test,
            num_classes,
            settings,
            device=device,
            progress=progress,
        )


# ----------------------------------------------------------------------------- source-level API


def check_linear_probe(
    encoder: Backbone,
    train_source: str,
    val_source: str,
    preset: str,
    settings: MaeProbe | GridProbe,
    extract: ExtractSettings,
    cached: bool = False,
) -> tuple[Any, torch.Tensor | None]:
    """What :func:`linear_probe` checks before its first forward pass: labels in both splits, then
    MAE's plan (the effective batch against the training split) or the grid's (its blocks against
    the encoder's depth, the carved split, the iterations). Returns the source's train split
    without a transform and, for the grid, its labels (read without the encoder; None for a
    stream, whose cached grid is checked on its extracted labels)."""
    plain = build_source(train_source, "train", None)
    require_labels(plain, train_source, "train")
    if val_source != train_source:
        require_labelled_source(val_source, "val")
    if preset == "mae":
        mae_plan(settings, len(plain))
        return plain, None
    labels = split_labels(encoder, train_source, "train", extract, plain)
    if labels is None and not cached:
        raise ValueError(
            f"{train_source!r} is a stream: the augmented grid carves its selection split by class and "
            "needs the labels up front; pass --cached, or use an image folder or the embedded sets"
        )
    if labels is not None:
        grid_plan(settings, labels, len(encoder.blocks))
    return plain, labels


def linear_probe(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    preset: str = "mae",
    cached: bool = False,
    settings: MaeProbe | GridProbe | None = None,
    extract: ExtractSettings | None = None,
) -> dict[str, Any]:
    """Probe ``encoder``: train on ``train_source``'s train split, score ``val_source``'s val split.

    ``val_source`` defaults to ``train_source``. ``settings`` are the probe's (their batch size is
    the training batch); ``extract`` says how features are computed (its ``batch_size`` is the
    feature-extraction batch, its device also trains the heads; ``n_last_blocks`` follows the
    preset: 1 for ``mae``, the grid's largest for ``grid``). Returns a result dict (see
    :mod:`mimkit.eval.common`) whose ``mode`` says ``augmented`` (the published protocol) or ``cached``.
    """
    settings = settings or preset_settings(preset)
    if not isinstance(settings, MaeProbe if preset == "mae" else GridProbe):
        raise ValueError(f"settings {type(settings).__name__} do not belong to the {preset!r} preset")
    extract = extract or ExtractSettings()
    n_last = max(settings.n_last_blocks) if preset == "grid" else 1
    extract = replace(extract, img_size=extract.image_size(encoder), n_last_blocks=n_last)
    device, progress, img_size = torch.device(extract.device), extract.progress, extract.img_size
    val_source = val_source or train_source
    norm = input_normalization(encoder)
    run = dict(device=device, progress=progress)
    plain, labels = check_linear_probe(encoder, train_source, val_source, preset, settings, extract, cached)
    test = source_features(encoder, val_source, "val", extract)
    if cached:
        train = source_features(encoder, train_source, "train", extract)
        num_train, num_classes = len(train["label"]), max(int(train["num_classes"]), int(test["num_classes"]))
        trainer = train_mae_probe if preset == "mae" else train_grid_probe
        out = trainer(train, test, num_classes, settings, **run)
    else:
        num_train, num_classes = len(plain), max(num_classes_of(plain), int(test["num_classes"]))
        augmented = classification_source(
            train_source, "train", probe_train_transform(preset, img_size, norm)
        )
        batches = augmented_batches(augmented, encoder, extract, seed=settings.seed)
        if preset == "mae":
            out = run_mae_probe(batches, num_train, test, num_classes, settings, **run)
        else:
            num_classes = max(num_classes, int(labels.max()) + 1)
            centre = classification_source(train_source, "train", build_transform("eval", img_size, norm))

            def selection(held: torch.Tensor) -> dict[str, torch.Tensor]:
                return extract_features(encoder, Subset(centre, held.tolist()), extract, desc="selection")

            out = run_grid_probe(batches, labels, selection, test, num_classes, settings, **run)
    out.pop("head", None)
    mode = "cached" if cached else "augmented"
    settings_out = {
        "preset": preset,
        "mode": mode,
        "precision": extract.precision,
        **asdict(settings),
        **out.pop("plan"),
        "extract": extract.to_dict(),
    }
    data = data_info(train_source, val_source, img_size, num_train, len(test["label"]), num_classes)
    note = (
        "cached: trained on features of centre crops extracted once, without augmentation (a fast "
        "variant, not the published protocol)"
        if cached
        else f"augmented: the published {preset} protocol"
    )
    protocol = "mae-linear-probe" if preset == "mae" else "dinov2-linear-grid"
    return result(
        "linear_probe", protocol, describe_encoder(encoder), data, settings_out, out, mode=mode, note=note
    )


def format_linear_probe(res: dict[str, Any]) -> str:
    """The human table of a :func:`linear_probe` result."""
    s, r = res["settings"], res["results"]
    title = f"linear probe {res['protocol']} ({res['mode']}) of {res['encoder']['spec']}" + (
        " [random init]" if res["encoder"].get("random_init") else ""
    )
    if res["protocol"] == "mae-linear-probe":
        rows = [
            ["top-1 %, last epoch", r["top1"]],
            ["max top-1 % over epochs (picked on the test split)", r["max_top1_over_epochs"]],
            ["epochs / warm-up epochs", f"{s['epochs']} / {s['warmup_epochs']:.3g}"],
            [
                "effective batch",
                f"{s['effective_batch']} = {s['batch_size']} x {s['accum_steps']} accumulated",
            ],
            ["lr (LARS)", f"{s['lr']:g} = {s['blr']:g} x {s['effective_batch']} / 256"],
        ]
        return format_table(["", "value"], rows, title)
    best = r["best"]
    rows = [
        ["top-1 % of the selected head", r["top1"]],
        ["selected head (on the carved val split)", best["name"]],
        ["  its val top-1 %", best["val_top1"]],
        ["heads / iterations / batch", f"{s['num_heads']} / {s['iterations']} / {s['batch_size']}"],
        ["fit / selection images", f"{s['num_fit']} / {s['num_selection']}"],
    ]
    top = sorted(r["grid"], key=lambda h: -h["val_top1"])[:10]
    grid = format_table(
        ["head (10 best by val top-1; all in the JSON)", "lr", "val top-1", "test top-1"],
        [[h["name"], f"{h['lr']:g}", h["val_top1"], h["test_top1"]] for h in top],
    )
    return f"{format_table(['', 'value'], rows, title)}\n\n{grid}"
