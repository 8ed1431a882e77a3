"""Segmentation metrics from a streaming confusion matrix: IoU per class, mIoU, pixel accuracy.

The matrix ``conf[g, p]`` counts pixels of ground-truth class g predicted as class p; pixels whose
ground truth is the ignore label are never counted. It is updated batch by batch on the device of
the predictions with one ``bincount`` (never a per-pixel Python list), so a whole validation set
at 512 px costs C x C integers.

- IoU of class c = conf[c, c] / (row_c + col_c - conf[c, c]); a class that is neither in the
  ground truth nor ever predicted has no IoU (NaN) and is left out of the mean (mmsegmentation's
  convention); a class predicted but absent from the ground truth scores 0.
- Identity mIoU (the primary number) reads predicted class c as class c.
- Hungarian mIoU first matches predicted to ground-truth classes one to one so that the summed IoU
  is largest (open-hummingbird-eval's ``PredsmIoU``, there with scipy's ``linear_sum_assignment``
  on the IoU matrix; here a small exact Hungarian solver, so scipy is not needed). It is an upper
  bound of the identity mIoU and is invariant to renaming the classes.
"""

from __future__ import annotations

import numpy as np
import torch


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of the rows of ``cost`` (n, m), n <= m, to distinct columns.

    The shortest-augmenting-path form of the Hungarian algorithm with potentials (Kuhn-Munkres,
    O(n^2 m)); the inner loop over columns is vectorised. Returns ``cols`` (n,): row i -> cols[i].
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n > m:
        raise ValueError(f"hungarian needs rows <= columns, got a {n} x {m} matrix (pass its transpose)")
    # 1-based as in the classical formulation: column 0 is a virtual column holding the free row.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j] = row assigned to column j (0 = none)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used
            free[0] = False
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free[1:], minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.empty(n, dtype=np.int64)
    for j in range(1, m + 1):
        if owner[j]:
            cols[owner[j] - 1] = j - 1
    return cols


def iou_matrix(conf: torch.Tensor) -> torch.Tensor:
    """IoU of every (ground-truth class g, predicted class p) pair, float64 (C, C)."""
    conf = conf.double()
    rows, cols = conf.sum(1, keepdim=True), conf.sum(0, keepdim=True)
    union = rows + cols - conf
    return torch.where(union > 0, conf / union.clamp(min=1), torch.zeros_like(conf))


def _mean_over_scored(iou: torch.Tensor, scored: torch.Tensor) -> float:
    return float(iou[scored].mean()) if bool(scored.any()) else float("nan")


class ConfusionMatrix:
    """A streaming (C, C) confusion matrix: ``update`` per batch, then the metrics."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count predicted class ids ``pred`` against ground truth ``target`` (same shape, integers)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        c = self.num_classes
        pred = pred.reshape(-1).to(self.conf.device, torch.int64)
        target = target.reshape(-1).to(self.conf.device, torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            bad = target[(target < 0) | (target >= c)][0]
            raise ValueError(
                f"ground-truth class {int(bad)} is outside 0..{c - 1} and is not the ignore label "
                f"{self.ignore_index}"
            )
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
            raise ValueError(f"predicted class ids must lie in 0..{c - 1}")
        self.conf += torch.bincount(target * c + pred, minlength=c * c).view(c, c)

    def iou(self) -> torch.Tensor:
        """IoU per class with the identity mapping, float64 (C,); NaN where a class has no pixels at all."""
        conf = self.conf.double()
        inter = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def miou(self) -> float:
        """Identity-mapped mIoU over the classes present in the ground truth or the predictions."""
        iou = self.iou()
        return _mean_over_scored(iou, ~iou.isnan())

    def hungarian_mapping(self) -> torch.Tensor:
        """``mapping[g]`` = the predicted class matched to ground-truth class g (max summed IoU)."""
        return torch.from_numpy(hungarian(-iou_matrix(self.conf.cpu()).numpy()))

    def hungarian_iou(self) -> torch.Tensor:
        """IoU per ground-truth class after Hungarian matching, float64 (C,); NaN as in :meth:`iou`."""
        mapping = self.hungarian_mapping()
        conf = self.conf.cpu()
        iou = iou_matrix(conf)[torch.arange(self.num_classes), mapping]
        present = (conf.sum(1) > 0) | (conf.sum(0)[mapping] > 0)
        return torch.where(present, iou, torch.full_like(iou, float("nan")))

    def hungarian_miou(self) -> float:
        """mIoU after matching predicted to ground-truth classes one to one (open-hummingbird-eval's)."""
        iou = self.hungarian_iou()
        return _mean_over_scored(iou, ~iou.isnan())

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly (identity mapping)."""
        total = int(self.conf.sum())
        return float(self.conf.diagonal().sum()) / total if total else float("nan")

    def summary(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """Metrics as a JSON-ready dict (fractions in [0, 1]); per-class IoU keyed by class name."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        iou = self.iou()
        return {
            "miou": self.miou(),
            "miou_hungarian": self.hungarian_miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "classes_scored": int((~iou.isnan()).sum()),
            "per_class_iou": {n: (None if v != v else float(v)) for n, v in zip(names, iou.tolist())},
            "pixels": int(self.conf.sum()),
        }
