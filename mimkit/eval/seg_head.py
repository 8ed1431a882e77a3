"""The linear segmentation head of DINOv2's protocol, its schedule and loss, and how it trains and scores.

DINOv2 (Oquab et al. 2023, section 7.4, semantic segmentation; code ``dinov2/eval/segmentation``,
``BNHead`` in ``models/decode_heads/linear_head.py``, and the released mmseg configs
``dinov2_vit*14_{ade20k,voc2012}_linear_config.py``):

- **Head.** The frozen patch tokens form a (D, h, w) map; ``BNHead`` puts it through a
  ``BatchNorm`` (affine; SyncBN across the 8 GPUs) and mmseg's ``conv_seg``, a 1x1 convolution to
  the classes (weight N(0, 0.01), bias 0; no dropout). That is ``head="bn"`` here, the default;
  ``head="linear"`` drops the BatchNorm. The paper calls the BN head "linear": BN in train mode
  only re-centres and re-scales the features, and in eval mode it folds into the linear layer.
- **Loss.** The logits (C, h, w) are upsampled bilinearly (``align_corners=False``) to the label
  map, then pixel-wise cross-entropy with the ignore label (255) left out. mmseg 0.x averages over
  *all* pixels of the batch (``avg_non_ignore=False``): ignored pixels add nothing to the sum but
  count in the denominator. :func:`pixel_cross_entropy` does the same.
- **Optimiser.** AdamW, lr 1e-3, weight decay 1e-4 on every parameter, betas (0.9, 0.999).
- **Schedule.** mmcv's ``poly`` (power 1, min lr 0) over 40,000 iterations, with a linear warm-up
  over the first 1,500 from ``warmup_ratio`` 1e-6 (:func:`poly_lr`).
- **Batch.** 16 images per iteration (2 per GPU on 8 GPUs), 512 x 512 crops.

``lin+4`` (the "+ms" row's features) concatenates the final-normed patch tokens of the last 4
blocks (``n_last_blocks=4``); the "+ms" row also trains at 640 px and tests at several scales
with flips, which is not done here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mimkit.eval.incontext import upsample_argmax
from mimkit.eval.seg_data import IGNORE_INDEX
from mimkit.eval.segmetrics import ConfusionMatrix

HEADS = ("bn", "linear")
DINOV2_ITERATIONS = 40_000
DINOV2_WARMUP = 1_500

# A batch of the probe: dense features (B, N, D) and label maps (B, H, W) with 255 ignored.
SegBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SegProbe:
    """DINOv2's linear segmentation settings; every default is the published value.

    Attributes:
        head: ``bn`` (DINOv2's BNHead: BatchNorm + 1x1 conv) or ``linear`` (the 1x1 conv alone).
        n_last_blocks: blocks whose final-normed patch tokens are concatenated (1: "linear",
            4: "lin+4" of the "+ms" row).
        iterations: optimiser steps (40,000).
        batch_size: images per step (16 = 2 per GPU x 8 GPUs).
        warmup_iters: linear warm-up steps; None: 1,500 / 40,000 of ``iterations`` (DINOv2's 1,500
            at 40,000), so a shortened run keeps the schedule's shape.
        warmup_ratio: the warm-up's starting fraction of the lr (mmcv's 1e-6).
        lr: AdamW's peak lr (1e-3); not scaled with the batch.
        weight_decay: AdamW's decoupled weight decay (1e-4), on every parameter.
        betas: AdamW's (0.9, 0.999).
        power: exponent of the poly decay (1: linear to 0).
        seed: head initialisation and sample order.
    """

    head: str = "bn"
    n_last_blocks: int = 1
    iterations: int = DINOV2_ITERATIONS
    batch_size: int = 16
    warmup_iters: int | None = None
    warmup_ratio: float = 1e-6
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    power: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown segmentation head {self.head!r}; valid: {', '.join(HEADS)}")
        for name in ("n_last_blocks", "iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.warmup_iters is not None and not 0 <= self.warmup_iters < self.iterations:
            raise ValueError(
                f"warmup_iters={self.warmup_iters} must be in [0, iterations={self.iterations}) "
                "(or None for 1500/40000 of the iterations)"
            )
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be non-negative")
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in (0, 1]")

    @property
    def warmup(self) -> int:
        """The warm-up steps this run uses."""
        if self.warmup_iters is not None:
            return self.warmup_iters
        return round(self.iterations * DINOV2_WARMUP / DINOV2_ITERATIONS)


class SegLinearHead(nn.Module):
    """Per-patch logits: optional ``BatchNorm`` (affine) over the channels, then a linear map to the classes.

    The linear layer is mmseg's 1x1 ``conv_seg`` (weight N(0, 0.01), bias 0) applied to tokens;
    the BatchNorm normalises each channel over the batch and every patch, which is what a
    ``BatchNorm2d`` over the (B, D, h, w) map computes.
    """

    def __init__(self, dim: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim) if batchnorm else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, D), row-major on ``grid`` (h, w) -> logits (B, C, h, w)."""
        b, n, d = tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"{n} tokens do not fill a {grid[0]} x {grid[1]} patch grid")
        logits = self.linear(self.norm(tokens.reshape(b * n, d)))
        return logits.view(b, *grid, -1).permute(0, 3, 1, 2)


def poly_lr(iteration: int, settings: SegProbe, min_lr: float = 0.0) -> float:
    """The lr of step ``iteration`` (0-based): mmcv's ``poly`` policy with its linear warm-up.

    ``poly = (lr - min_lr) x (1 - iteration / iterations) ** power + min_lr``; during the warm-up it
    is multiplied by ``1 - (1 - iteration / warmup) x (1 - warmup_ratio)``, rising from
    ``warmup_ratio`` to 1.
    """
    s = settings
    lr = (s.lr - min_lr) * (1 - iteration / s.iterations) ** s.power + min_lr
    if iteration < s.warmup:
        lr *= 1 - (1 - iteration / s.warmup) * (1 - s.warmup_ratio)
    return lr


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, C, h, w) upsampled bilinearly to label maps (B, H, W).

    Pixels labelled :data:`IGNORE_INDEX` add nothing; the sum is divided by every pixel of the
    batch, ignored ones included (mmseg 0.x's ``avg_non_ignore=False``, DINOv2's).
    """
    up = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, masks.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / masks.numel()


def train_seg_head(
    batches: Iterable[SegBatch],
    dim: int,
    num_classes: int,
    grid: tuple[int, int],
    settings: SegProbe,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    log_points: int = 20,
) -> dict[str, Any]:
    """Train a :class:`SegLinearHead` on ``settings.iterations`` batches of ``batches``.

    Returns ``head`` (in eval mode), ``loss_curve`` (``[iteration, mean loss since the previous
    point]``, ``log_points`` of them), ``final_loss`` (the mean over the last tenth of the steps)
    and ``seconds``.
    """
    s = settings
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        head = SegLinearHead(dim, num_classes, batchnorm=s.head == "bn").to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    every = max(1, math.ceil(s.iterations / log_points))
    tail = max(1, s.iterations // 10)
    curve, window, tail_losses = [], [], []
    start = time.perf_counter()
    head.train()
    stream: Iterator[SegBatch] = iter(batches)
    bar = tqdm(range(s.iterations), desc="seg head", disable=not progress, leave=False)
    for it in bar:
        try:
            tokens, masks = next(stream)
        except StopIteration:
            raise ValueError(f"the batch source ran out after {it} of {s.iterations} iterations") from None
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(it, s)
        loss = pixel_cross_entropy(head(tokens.to(device), grid), masks.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the segmentation loss became {value} at iteration {it}")
        window.append(value)
        if it >= s.iterations - tail:
            tail_losses.append(value)
        if (it + 1) % every == 0 or it + 1 == s.iterations:
            curve.append([it + 1, sum(window) / len(window)])
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            window = []
    return {
        "head": head.eval(),
        "loss_curve": curve,
        "final_loss": sum(tail_losses) / len(tail_losses),
        "seconds": round(time.perf_counter() - start, 2),
    }


@torch.no_grad()
def count_predictions(conf: ConfusionMatrix, logits: torch.Tensor, masks: torch.Tensor) -> None:
    """Upsample logits (B, C, h, w) bilinearly to the label maps (B, H, W), argmax, count into ``conf``."""
    b, c, h, w = logits.shape
    flat = logits.permute(0, 2, 3, 1).reshape(b, h * w, c)
    pred = upsample_argmax(flat, (h, w), tuple(masks.shape[-2:]))
    conf.update(pred, masks.to(pred.device))


@torch.no_grad()
def score_seg_head(
    head: SegLinearHead,
    batches: Iterable[SegBatch],
    num_classes: int,
    grid: tuple[int, int],
    ignore_index: int | None = None,
    *,
    device: str | torch.device = "cpu",
) -> ConfusionMatrix:
    """The confusion matrix of ``head`` (eval mode) over every batch of ``batches``."""
    head.eval()
    conf = ConfusionMatrix(num_classes, ignore_index, device=device)
    for tokens, masks in batches:
        count_predictions(conf, head(tokens.to(device), grid), masks.to(device))
    return conf
