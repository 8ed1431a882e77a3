"""Image transforms for pretraining and evaluation, on torchvision.transforms.v2.

Each transform takes and returns a sample dict (see :mod:`mimkit.data.sample`), so a segmentation
mask, wrapped as ``tv_tensors.Mask``, is cropped, resized (nearest) and flipped with its image. The
output image is float32 normalised with the ImageNet statistics; :func:`denormalize` undoes that.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_KINDS = ("pretrain", "eval", "none")
EVAL_CROP_FRACTION = 0.875  # 224 / 256, as in MAE's and DeiT's evaluation


def _to_normalised_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def pretrain_transform(img_size: int) -> v2.Compose:
    """MAE's pretraining augmentation: random resized crop (scale 0.2-1, bicubic), flip, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                img_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            *_to_normalised_float(),
        ]
    )


def eval_transform(img_size: int) -> v2.Compose:
    """Resize the shorter side to ``img_size / 0.875`` (bicubic), center-crop ``img_size``, normalise.

    Small images are upsampled like any other: a 64x64 synthetic image at ``img_size=64`` becomes
    73x73 and loses its outer 4-5 pixels to the crop, the same framing the network sees for photos.
    """
    return v2.Compose(
        [
            v2.Resize(
                int(img_size / EVAL_CROP_FRACTION), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.CenterCrop(img_size),
            *_to_normalised_float(),
        ]
    )


def build_transform(kind: str, img_size: int) -> v2.Compose:
    """The transform of ``kind`` in :data:`TRANSFORM_KINDS`.

    ``"none"`` only converts the image to float in [0, 1], unnormalised and at its own size.
    """
    if kind == "pretrain":
        return pretrain_transform(img_size)
    if kind == "eval":
        return eval_transform(img_size)
    if kind == "none":
        return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    raise ValueError(f"unknown transform kind {kind!r}; valid kinds: {', '.join(TRANSFORM_KINDS)}")


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of images (..., 3, H, W) and clamp to [0, 1] for display."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
