"""Checks every evaluation runs before its first forward pass: a bad setting costs seconds, not an extraction.

Whatever depends only on the arguments and on the data's size or labels is checked here first: the
probe's batch against the training split, shots against the smallest class, neighbour counts
against the bank, the memory a bank or a token cache will take against the memory there is. Each
error names the bad value, the largest (or smallest) one that works here, and the option to change.

Labels are read without running the encoder: an image folder lists them (``samples``), the
embedded synthetic sets draw the scene alone (``scene(i).label``: no transform; 0.5 ms at 64 px
against about 19 ms for a ViT-Ti/8 forward pass on one core), and any other indexable source is
read sample by sample. A stream (a webdataset source) has no labels before it is read; only its
size is checked there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

# The share of the free memory a planned allocation may take: the process needs the rest (the
# encoder, the loader's batches, the search blocks' temporaries).
MEMORY_HEADROOM = 0.9


def format_bytes(n: float) -> str:
    """``n`` bytes as KiB / MiB / GiB with two decimals (one for MiB)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def available_bytes(device: str | torch.device) -> int | None:
    """Free memory on ``device``: the GPU's free memory, or the host's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, device: str | torch.device, what: str, advice: str) -> int | None:
    """Raise a ValueError when ``need`` bytes exceed :data:`MEMORY_HEADROOM` of the free memory.

    ``what`` names the allocation, ``advice`` the options that shrink it. Returns the free bytes
    (None where they are unknown: then nothing is checked).
    """
    free = available_bytes(device)
    if free is not None and need > MEMORY_HEADROOM * free:
        raise ValueError(
            f"{what} needs {format_bytes(need)} on {torch.device(device)}, more than the "
            f"{format_bytes(free)} free there ({MEMORY_HEADROOM:.0%} of it may be planned); {advice}"
        )
    return free


class _LabelOnly(Dataset):
    """The labels of an indexable source, read as cheaply as the source allows (see the module docstring)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        if hasattr(self.dataset, "scene"):
            return int(self.dataset.scene(index).label)
        return int(self.dataset[index]["label"])


def source_labels(dataset: Any, workers: int = 0) -> torch.Tensor | None:
    """(N,) long labels of ``dataset`` without running an encoder; None for a stream.

    ``workers`` loader processes read them where the source has to draw or decode samples.
    """
    if hasattr(dataset, "samples"):
        return torch.as_tensor([label for _, label in dataset.samples], dtype=torch.long)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        return None
    loader = DataLoader(_LabelOnly(dataset), batch_size=512, num_workers=workers)
    parts = [batch.long() for batch in loader]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def class_name(dataset: Any, label: int) -> str:
    """``'name' (label)`` where the source names its classes, else the label alone."""
    names = getattr(dataset, "class_names", None)
    return f"{names[label]!r} ({label})" if names and 0 <= label < len(names) else str(label)


def check_shots(
    labels: torch.Tensor | None, shots: Sequence[int], num_train: int, dataset: Any, option: str = "--shots"
) -> None:
    """Every class must hold at least ``max(shots)`` training images.

    With ``labels`` None (a stream) only the necessary bound ``max(shots) x classes <= num_train``
    is checked, over the classes the source names.
    """
    bad = [n for n in shots if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ValueError(f"{option} {' '.join(map(str, bad))}: images per class must be positive integers")
    if not shots:
        return
    most = max(shots)
    if labels is None:
        classes = len(getattr(dataset, "class_names", ()) or ())
        if classes and most * classes > num_train:
            raise ValueError(
                f"{option} {most} needs {most} images of each of {classes} classes, {most * classes} in all, "
                f"but the training split has {num_train}; the largest valid is {num_train // classes}"
            )
        return
    counts = torch.bincount(labels)
    present = counts.nonzero().flatten()
    smallest = int(present[counts[present].argmin()])
    if counts[smallest] < most:
        raise ValueError(
            f"{option} {most}: class {class_name(dataset, smallest)} has {int(counts[smallest])} training "
            f"images, fewer than {most} per class; the largest valid is {int(counts[smallest])} (the "
            f"smallest class), so pass {option} values up to {int(counts[smallest])}"
        )


def check_neighbours(
    ks: Sequence[int], bank: int, option: str = "--ks", what: str = "training images"
) -> None:
    """Every k in ``ks`` must be positive and at most ``bank``."""
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not ks:
        raise ValueError(f"{option} {' '.join(map(str, ks))}: neighbour counts must be positive integers")
    if max(ks) > bank:
        raise ValueError(
            f"{option} {max(ks)} exceeds the {bank} {what}; the largest valid is {bank}, so pass "
            f"{option} values up to {bank}"
        )


def check_positive(**values: float) -> None:
    """Each keyword must be a positive number (its name is the option's, ``_`` for ``-``)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be positive")


def check_img_size(img_size: int, patch_size: int) -> None:
    """An input side the encoder can take: a positive multiple of its patch size."""
    if img_size < patch_size or img_size % patch_size:
        lower = max(patch_size, img_size // patch_size * patch_size)
        upper = math.ceil(img_size / patch_size) * patch_size
        nearby = sorted({lower, max(upper, patch_size)})
        which = f"sizes are {nearby[0]} and {nearby[1]}" if len(nearby) == 2 else f"size is {nearby[0]}"
        raise ValueError(
            f"img_size={img_size} is not a multiple of the encoder's patch size {patch_size}; the nearest "
            f"valid {which} (--img-size)"
        )
