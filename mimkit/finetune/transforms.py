"""MAE's fine-tuning augmentation: timm's ``create_transform``, on mimkit's sample dicts.

MAE (``main_finetune.py``, ``util/datasets.py``) trains with timm's ImageNet transform:
RandomResizedCrop (area 0.08-1, bicubic), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``,
normalisation and random erasing (probability 0.25, per-pixel noise); colour jitter is off when
RandAugment is on. :func:`finetune_transform` builds exactly that transform from timm and applies
it to the image of a sample dict, so any mimkit source feeds it.

timm's augmentations draw from Python's ``random`` and NumPy's global generators, which mimkit's
loader does not seed per sample (it seeds only torch's, :class:`~mimkit.train.loader.SeededSamples`).
Each call therefore seeds both from one draw of torch's generator and restores them afterwards:
a sample's augmentation follows from its torch seed alone (the same whatever the workers and on
resume), and the training process's own Python and NumPy streams (timm's Mixup draws from NumPy)
are left as they were.

One repair: at the top of its magnitude range (``m9`` plus noise reaches 10) timm's posterize asks
Pillow to keep 0 bits, which older Pillow answered with a black image and Pillow 13 refuses with a
ValueError; the posterize operations are given the old answer (:func:`posterize`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import AutoAugment, create_transform
from torchvision.transforms.v2 import functional as F

from mimkit.data.transforms import Normalization, ToChannels

FINETUNE_TRANSFORM = "finetune"  # the data.transform kind that selects this augmentation


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep ``bits_to_keep`` bits per channel; 0 bits gives black, as Pillow before 13 did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> list:
    """The operations of timm's RandAugment, AutoAugment and AugMix inside a composed transform."""
    ops = []
    for t in getattr(transform, "transforms", []):
        ops += list(getattr(t, "ops", []))
        for sub_policy in getattr(t, "policy", []) if isinstance(t, AutoAugment) else []:
            ops += list(sub_policy)
    return ops


def check_auto_augment(policy: str) -> None:
    """Raise a ValueError unless timm reads ``policy`` (``rand-m9-mstd0.5-inc1``, ``augmix-m5``...)."""
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (ValueError, AssertionError, KeyError, IndexError) as err:
        raise ValueError(
            f"not a timm augmentation policy ({err}); e.g. rand-m9-mstd0.5-inc1 (RandAugment, MAE's), "
            "augmix-m5-w4-d2, original (AutoAugment), or null for none"
        ) from None


class FinetuneTransform:
    """A sample dict's image through timm's training transform; the label passes, a mask is left as it is.

    The image (uint8, C x H x W) is first brought to ``norm``'s channel count, then converted to a
    PIL image (timm's RandAugment works on PIL) and returned as a normalised float tensor.
    Masks are not transformed: fine-tuning reads labels only.
    """

    def __init__(
        self,
        img_size: int,
        norm: Normalization,
        crop_scale: Sequence[float] = (0.08, 1.0),
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        random_erase: float = 0.25,
    ):
        self.channels = ToChannels(norm.channels)
        self.timm = create_transform(
            img_size,
            is_training=True,
            scale=tuple(crop_scale),
            color_jitter=None,
            auto_augment=auto_augment,
            interpolation="bicubic",
            re_prob=random_erase,
            re_mode="pixel",
            re_count=1,
            mean=norm.mean,
            std=norm.std,
        )
        for op in _augment_ops(self.timm):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = F.to_pil_image(self.channels(sample["image"]).as_subclass(torch.Tensor))
        seed = int(torch.randint(0, 2**62, (1,)))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return {**sample, "image": self.timm(image)}
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.timm})"


def finetune_transform(
    img_size: int,
    norm: Normalization,
    crop_scale: Sequence[float] = (0.08, 1.0),
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    random_erase: float = 0.25,
) -> FinetuneTransform:
    """The fine-tuning augmentation at ``img_size``, normalising with ``norm`` (see the module docstring)."""
    return FinetuneTransform(img_size, norm, crop_scale, auto_augment, random_erase)
