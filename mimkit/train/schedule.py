"""MAE's learning-rate schedule (``util/lr_sched.py``): linear warm-up, then a half-cycle cosine.

The schedule is a function of the fractional epoch ``step / steps_per_epoch`` and is evaluated
once per optimizer step, before the step, so the first step runs at lr 0 as in the official code.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int,
    steps_per_epoch: int,
    lr: float,
    epochs: float,
    warmup_epochs: float,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``lr * e / warmup_epochs`` during warm-up, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * (e - warmup_epochs) / (epochs - warmup_epochs))) / 2``,
    where ``e = step / steps_per_epoch``.
    """
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
