"""The sample dict that every source yields, and the one function that builds it.

A sample is ``{"image": FloatTensor (3, H, W), "label": LongTensor (), "mask": LongTensor (H, W)}``
with ``label`` and ``mask`` present only where the source knows them; one source always yields the
same keys, so ``torch.utils.data.default_collate`` stacks its samples into a batch dict.

A transform is any callable that takes and returns the dict ``{"image": tv_tensors.Image (uint8),
"mask": Mask, "label": int}``; every ``torchvision.transforms.v2`` transform qualifies and moves the
image and its mask together, the mask always with nearest-neighbour interpolation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

SPLITS = ("train", "val")

Transform = Callable[[dict[str, Any]], dict[str, Any]]


class Mask(tv_tensors.Mask):
    """A class mask (H, W) that resizes with pixel-centre-aligned nearest-neighbour sampling.

    torchvision resizes a ``tv_tensors.Mask`` with legacy "nearest", which samples source pixel
    ``floor(i * in / out)`` and so shifts the mask by up to half a pixel against its bicubic-resized
    image; "nearest-exact" samples ``floor((i + 0.5) * in / out)`` and keeps the two aligned. Every
    other operation is ``tv_tensors.Mask``'s.
    """


def _resize_exact(mask: torch.Tensor, size: list[int] | None, max_size: int | None = None) -> torch.Tensor:
    plain = mask.as_subclass(torch.Tensor)
    flat = plain.ndim == 2
    out = F.resize_image(
        plain[None] if flat else plain,
        size,
        interpolation=InterpolationMode.NEAREST_EXACT,
        max_size=max_size,
        antialias=False,
    )
    return tv_tensors.wrap(out[0] if flat else out, like=mask)


@F.register_kernel(F.resize, Mask)
def _resize_mask(mask: Mask, size: list[int] | None, max_size: int | None = None, **kwargs: Any) -> Mask:
    return _resize_exact(mask, size, max_size)


@F.register_kernel(F.resized_crop, Mask)
def _resized_crop_mask(
    mask: Mask, top: int, left: int, height: int, width: int, size: list[int], **kwargs: Any
) -> Mask:
    return _resize_exact(F.crop(mask, top, left, height, width), size)


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise a ValueError naming it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def make_sample(
    image: torch.Tensor,
    *,
    label: int | None = None,
    mask: torch.Tensor | None = None,
    transform: Transform | None = None,
) -> dict[str, torch.Tensor]:
    """Build a sample from a uint8 image (3, H, W), apply ``transform`` jointly, return plain tensors.

    Whatever the transform, the returned image is floating point; an integer image left by the
    transform (or by no transform) is scaled to [0, 1]. The mask comes back as int64 (H, W).
    """
    sample: dict[str, Any] = {"image": tv_tensors.Image(image)}
    if label is not None:
        sample["label"] = label
    if mask is not None:
        sample["mask"] = Mask(mask)
    if transform is not None:
        sample = transform(sample)

    image = sample["image"]
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"the transform must return the image as a tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        image = F.to_dtype(image, torch.float32, scale=True)
    out = {"image": image.as_subclass(torch.Tensor)}
    if label is not None:
        out["label"] = torch.as_tensor(sample["label"], dtype=torch.long)
    if mask is not None:
        out["mask"] = sample["mask"].as_subclass(torch.Tensor).long()
    return out
