"""Image transforms for pretraining and evaluation, on torchvision.transforms.v2.

Each transform takes and returns a sample dict (see :mod:`mimkit.data.sample`), so a segmentation
mask, wrapped as ``tv_tensors.Mask``, is cropped, resized (nearest) and flipped with its image.

Every transform first brings the image to the channels the encoder reads (:class:`ToChannels`:
1 for greyscale, 3 for RGB) and ends normalising it with a :class:`Normalization`, ImageNet's
statistics unless the caller gives others; :func:`denormalize` undoes that. A greyscale set forced
into three replicated channels with ImageNet's statistics makes an easier reconstruction task and
a worse encoder, so recipes and exported encoders carry both choices (``data.channels``,
``data.mean``, ``data.std``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One channel: the average of ImageNet's channel statistics, as timm adapts RGB models to grey input.
IMAGENET_GREY_MEAN = (round(sum(IMAGENET_MEAN) / 3, 4),)
IMAGENET_GREY_STD = (round(sum(IMAGENET_STD) / 3, 4),)
CHANNELS = (1, 3)
TRANSFORM_KINDS = ("pretrain", "eval", "none")
EVAL_CROP_FRACTION = 0.875  # 224 / 256, as in MAE's and DeiT's evaluation
DEFAULT_CROP_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop area range
# ITU-R 601-2 luma, the weights of PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


def check_channels(channels: int) -> int:
    """Return ``channels`` if mimkit's image sources can produce it (1 or 3), else raise naming it."""
    if isinstance(channels, bool) or channels not in CHANNELS:
        raise ValueError(f"channels={channels!r} is not supported; valid: 1 (greyscale) or 3 (RGB)")
    return channels


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` of images scaled to [0, 1]; the channel count is their length."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        check_channels(len(self.mean))
        if len(self.std) != len(self.mean):
            raise ValueError(
                f"normalisation mean {list(self.mean)} and std {list(self.std)} differ in length"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalisation std {list(self.std)} must be positive")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def imagenet(cls, channels: int = 3) -> Normalization:
        """ImageNet's statistics for RGB; their channel averages for greyscale."""
        if check_channels(channels) == 1:
            return cls(IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
        return cls(IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, channels: int = 3) -> Normalization:
        """From ``{"mean": [...], "std": [...]}``; ``None`` gives :meth:`imagenet` for ``channels``."""
        if not data:
            return cls.imagenet(channels)
        return cls(tuple(data["mean"]), tuple(data["std"]))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def transforms(self) -> list[v2.Transform]:
        """uint8 image -> float32 in [0, 1] -> normalised."""
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]


class ToChannels(v2.Transform):
    """Bring a uint8 image to ``channels`` channels: 1 (luma, rounded) or 3 (grey replicated).

    Grey replicated into RGB comes back exactly (torchvision's ``Grayscale`` truncates and so
    returns ``v - 1`` for most values); masks and labels pass through.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = check_channels(channels)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image) or inpt.shape[-3] == self.channels:
            return inpt
        plain = inpt.as_subclass(torch.Tensor)
        if self.channels == 3:
            out = plain.expand(*plain.shape[:-3], 3, *plain.shape[-2:]).clone()
        else:
            weights = torch.tensor(_LUMA, dtype=torch.float32).view(3, 1, 1)
            grey = (plain.float() * weights).sum(dim=-3, keepdim=True)
            out = grey.round().clamp(0, 255).to(plain.dtype) if not plain.is_floating_point() else grey
        return tv_tensors.wrap(out, like=inpt)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _norm(norm: Normalization | None) -> Normalization:
    return norm if norm is not None else Normalization()


def pretrain_transform(
    img_size: int, norm: Normalization | None = None, crop_scale: Sequence[float] = DEFAULT_CROP_SCALE
) -> v2.Compose:
    """MAE's pretraining augmentation: random resized crop (area ``crop_scale``, bicubic), flip, normalise."""
    norm = _norm(norm)
    return v2.Compose(
        [
            ToChannels(norm.channels),
            v2.RandomResizedCrop(
                img_size,
                scale=tuple(crop_scale),
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(),
            *norm.transforms(),
        ]
    )


def eval_transform(img_size: int, norm: Normalization | None = None) -> v2.Compose:
    """Resize the shorter side to ``img_size / 0.875`` (bicubic), center-crop ``img_size``, normalise.

    Small images are upsampled like any other: a 64x64 synthetic image at ``img_size=64`` becomes
    73x73 and loses its outer 4-5 pixels to the crop, the same framing the network sees for photos.
    """
    norm = _norm(norm)
    return v2.Compose(
        [
            ToChannels(norm.channels),
            v2.Resize(
                int(img_size / EVAL_CROP_FRACTION), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.CenterCrop(img_size),
            *norm.transforms(),
        ]
    )


def build_transform(
    kind: str,
    img_size: int,
    norm: Normalization | None = None,
    crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
) -> v2.Compose:
    """The transform of ``kind`` in :data:`TRANSFORM_KINDS`, normalising with ``norm`` (ImageNet's).

    ``"none"`` only brings the image to ``norm``'s channels and converts it to float in [0, 1],
    unnormalised and at its own size.
    """
    if kind == "pretrain":
        return pretrain_transform(img_size, norm, crop_scale)
    if kind == "eval":
        return eval_transform(img_size, norm)
    if kind == "none":
        return v2.Compose([ToChannels(_norm(norm).channels), v2.ToDtype(torch.float32, scale=True)])
    raise ValueError(f"unknown transform kind {kind!r}; valid kinds: {', '.join(TRANSFORM_KINDS)}")


def denormalize(images: torch.Tensor, norm: Normalization | None = None) -> torch.Tensor:
    """Undo ``norm`` (ImageNet's by default) on images (..., C, H, W) and clamp to [0, 1] for display."""
    norm = _norm(norm)
    shape = (norm.channels, 1, 1)
    mean, std = images.new_tensor(norm.mean).view(shape), images.new_tensor(norm.std).view(shape)
    return (images * std + mean).clamp(0.0, 1.0)
