"""Pictures of a pretraining run: reconstructions of held-out images and the metric curves."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from mimkit.files import atomic_write
from mimkit.ssl.targets import patchify, unpatchify

RECON_ROWS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(
    method: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Run a pixel-reconstructing method on normalised ``images`` (B, C, H, W) with a seeded mask.

    Predictions of a norm-pix model are in per-patch standardised units; they are mapped back
    with each original patch's own mean and variance, as MAE's visualisation does.

    Returns:
        Each of :data:`RECON_ROWS` as (B, C, H, W) in [0, 1]; masked patches are grey.
    """
    encoder = method.encoder
    generator = torch.Generator().manual_seed(seed)
    mask = method.mask_generator(images.shape[0], encoder.grid_size, generator=generator)
    out = method({"image": images}, mask=mask.to(images.device))
    if "pred" not in out:
        raise ValueError(f"{type(method).__name__} returns no pixel prediction 'pred' to draw")
    p, grid = encoder.patch_size, encoder.grid_size
    target = patchify(images, p)
    pred = out["pred"].float()
    if getattr(method, "norm_pix_loss", False):
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    patch_mask = mask.to(images.device)[..., None]
    grey = torch.zeros_like(target)  # zero is the mean colour after normalisation
    pictures = {
        "original": images,
        "masked": unpatchify(torch.where(patch_mask, grey, target), p, grid),
        "reconstruction": unpatchify(pred, p, grid),
        "reconstruction + visible": unpatchify(torch.where(patch_mask, pred, target), p, grid),
    }
    shape = (1, -1, 1, 1)
    return {k: (v * std.view(shape) + mean.view(shape)).clamp(0, 1).cpu() for k, v in pictures.items()}


def grid_picture(pictures: dict[str, torch.Tensor], scale: int = 2) -> torch.Tensor:
    """One (C, H, W) picture: a row per entry of :data:`RECON_ROWS`, a column per image."""
    rows = torch.cat([pictures[k] for k in RECON_ROWS])
    grid = make_grid(rows, nrow=pictures["original"].shape[0], padding=2, pad_value=1.0)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return grid


def save_recon_grid(pictures: dict[str, torch.Tensor], path: str | os.PathLike, scale: int = 2) -> Path:
    """Write :func:`grid_picture` of ``pictures`` as a PNG."""
    grid = grid_picture(pictures, scale)
    return atomic_write(path, lambda tmp: save_image(grid, tmp))


def recon_images(source: str, img_size: int, norm, num: int) -> torch.Tensor:
    """The first ``num`` images of ``source``'s val split (its train split where it has no val).

    Under the evaluation transform (resize, centre crop, ``norm``), so they are the same images
    every time: the pictures of one run, and of several, can be laid side by side.
    """
    from itertools import islice

    from torch.utils.data import IterableDataset

    from mimkit.data import build_source, build_transform

    transform = build_transform("eval", img_size, norm)
    try:
        dataset = build_source(source, split="val", transform=transform)
        if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
            raise ValueError("empty val split")
    except (ValueError, OSError):
        dataset = build_source(source, split="train", transform=transform)
    if isinstance(dataset, IterableDataset):
        samples = list(islice(iter(dataset), num))
    else:
        samples = [dataset[i] for i in range(min(num, len(dataset)))]
    if not samples:
        raise ValueError(f"{source} holds no images to reconstruct")
    return torch.stack([s["image"] for s in samples])


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_curves(
    metrics_paths: str | os.PathLike | Sequence[str | os.PathLike],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
) -> Path:
    """Plot every numeric metric against the step, one panel each, into a PNG.

    Several ``metrics.jsonl`` files overlay their runs, one line (and legend entry, ``labels`` or
    the run directory's name) each, in the panels of every metric any of them logged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [metrics_paths] if isinstance(metrics_paths, (str, os.PathLike)) else list(metrics_paths)
    labels = list(labels) if labels is not None else [Path(p).parent.name or str(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    runs = []
    for metrics_path in paths:
        records = [r for r in read_metrics(metrics_path) if "step" in r]
        if not records:
            raise ValueError(f"{metrics_path} holds no step records to plot")
        runs.append(records)
    keys = sorted(
        {
            k
            for records in runs
            for r in records
            for k, v in r.items()
            if _numeric(v) and k not in ("step", "epoch")
        }
    )
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        positive = True
        for label, records in zip(labels, runs):
            points = [(r["step"], r[key]) for r in records if _numeric(r.get(key))]
            if not points:
                continue
            positive = positive and all(v > 0 for _, v in points)
            marker = "o" if len(points) < 12 else None  # sparse records (evaluations, monitor) stay visible
            ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2, marker=marker, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss" and positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def default_mask_kinds(ratio: float = 0.75) -> dict[str, dict]:
    """Every ColorMAE colour next to random and block masking, all at ``ratio``."""
    from mimkit.ssl.colornoise import COLORS

    kinds = {c: {"type": "colornoise", "color": c, "ratio": ratio} for c in COLORS}
    kinds["random"] = {"type": "random", "ratio": ratio}
    kinds["block"] = {"type": "block", "ratio": ratio}
    return kinds


def plot_masks(
    path: str | os.PathLike,
    kinds: dict[str, dict] | None = None,
    grid_size: tuple[int, int] = (14, 14),
    num: int = 8,
    seed: int = 0,
    spectrum_samples: int = 512,
) -> Path:
    """Draw ``num`` sample masks per kind (one row each, visible = white) and their spectra.

    Args:
        kinds: ``{label: mask recipe entry}``; defaults to :func:`default_mask_kinds`.
        spectrum_samples: masks per kind averaged into the binary-mask spectrum.

    The right-hand panels hold the radially averaged power spectrum (cycles per patch) of the
    noise fields of each colour and of each kind's binary masks (mean removed), so a colour's
    spectral character can be read before and after thresholding.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimkit.ssl import masking
    from mimkit.ssl.colornoise import ColorNoiseMasking, radial_power_spectrum

    kinds = kinds or default_mask_kinds()
    rows, cols = grid_size
    line_colors = {"red": "tab:red", "green": "tab:green", "blue": "tab:blue", "purple": "tab:purple"}
    n_rows = max(len(kinds), 2)
    strip_width = 1.1 * num * (cols + 1) / rows  # inches, for strips 1.1 inch tall
    fig = plt.figure(figsize=(strip_width + 5.0, 1.45 * n_rows + 0.5))
    fig.suptitle(f"sample masks on a {rows}x{cols} grid (white = visible, black = masked)", fontsize=10)
    grid = fig.add_gridspec(n_rows, 2, width_ratios=[strip_width, 5.0])
    ax_noise, ax_mask = fig.add_subplot(grid[: n_rows // 2, 1]), fig.add_subplot(grid[n_rows // 2 :, 1])
    for i, (label, cfg) in enumerate(kinds.items()):
        gen = masking.build(cfg)
        masks = gen(max(num, spectrum_samples), grid_size, generator=torch.Generator().manual_seed(seed))
        masks = masks.view(-1, rows, cols).float()
        strip = torch.full((rows, num * (cols + 1) - 1), 0.6)
        for j in range(num):
            strip[:, j * (cols + 1) : j * (cols + 1) + cols] = 1 - masks[j]
        ax = fig.add_subplot(grid[i, 0])
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{label}  ({type(gen).__name__}, ratio {gen.ratio})", fontsize=9, loc="left")
        fallback = "black" if cfg.get("type") == "random" else "gray"
        style = {"color": line_colors.get(getattr(gen, "color", None), fallback)}
        freqs, power = radial_power_spectrum(masks - masks.mean((1, 2), keepdim=True))
        ax_mask.plot(freqs[1:], power[1:], label=label, **style)
        if isinstance(gen, ColorNoiseMasking):
            freqs, power = radial_power_spectrum(gen.bank(gen.color, grid_size))
            ax_noise.plot(freqs[1:], power[1:], label=label, **style)
    for ax, title in ((ax_noise, "noise fields"), (ax_mask, "binary masks (mean removed)")):
        ax.set_title(f"radial power spectrum: {title}", fontsize=9)
        ax.set_xlabel("frequency (cycles / patch)", fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
