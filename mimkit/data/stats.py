"""What a source's images are like: per-channel statistics (``data.mean: auto``) and greyscale checks.

Both read a fixed, evenly spaced sample of the split (the first images of a stream), untransformed
and at their own size, so the answer depends only on the source and the sample size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset

from mimkit.data.sources import build_source
from mimkit.data.transforms import Normalization, build_transform, check_channels

STATS_IMAGES = 1000  # images read for data.mean/std: auto
GREY_CHECK_IMAGES = 32  # images read to decide whether a source is greyscale


def _images(dataset: Dataset, count: int) -> Iterator[torch.Tensor]:
    """Up to ``count`` images (C, H, W) of ``dataset``: evenly spaced, or a stream's first."""
    if isinstance(dataset, IterableDataset):
        for sample in itertools.islice(dataset, count):
            yield sample["image"]
        return
    n = len(dataset)
    step = max(n / max(count, 1), 1.0)
    for index in sorted({int(i * step) for i in range(min(count, n))}):
        yield dataset[index]["image"]


def channel_stats(
    uri: str, split: str = "train", channels: int = 3, images: int = STATS_IMAGES
) -> Normalization:
    """Per-channel mean and standard deviation over every pixel of ``images`` images of ``uri``.

    Pixels are scaled to [0, 1] and brought to ``channels`` channels first (as training reads
    them); the standard deviation is the population one, accumulated in float64.
    """
    check_channels(channels)
    if images < 1:
        raise ValueError(f"channel_stats needs at least one image, got images={images}")
    plain = Normalization.imagenet(channels)  # only its channel count is used by "none"
    dataset = build_source(uri, split, build_transform("none", 1, plain))
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    pixels = 0
    for image in _images(dataset, images):
        flat = image.double().flatten(1)
        total += flat.sum(1)
        squares += (flat * flat).sum(1)
        pixels += flat.shape[1]
    if pixels == 0:
        raise ValueError(f"source {uri!r} ({split}) holds no images to compute statistics from")
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp(min=0).sqrt()
    if bool((std < 1e-6).any()):
        raise ValueError(
            f"source {uri!r} ({split}) has a constant channel (std {std.tolist()}): data.std: auto cannot "
            "normalise it; give data.mean and data.std as lists"
        )
    return Normalization(tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std))


def looks_greyscale(uri: str, split: str = "train", images: int = GREY_CHECK_IMAGES) -> bool:
    """True when every sampled image of ``uri`` has equal R, G and B (greyscale, maybe stored as RGB)."""
    dataset = build_source(uri, split, build_transform("none", 1, Normalization.imagenet(3)))
    seen = 0
    for image in _images(dataset, images):
        if not (torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])):
            return False
        seen += 1
    return seen > 0
