"""The training augmentation of DINOv2's linear segmentation probe (mmsegmentation's ADE20K pipeline).

DINOv2 (Oquab et al. 2023) trains its segmentation heads with mmsegmentation 0.x's standard
ADE20K pipeline at a 512 crop; :func:`seg_probe_transform` is it at ``img_size``:

1. ``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))``, aspect kept: the shorter side goes to
   ``img_size x r`` with r uniform in [0.5, 2], the longer side capped at ``4 x img_size x r``;
   image bilinear, mask nearest (pixel-centre aligned, :class:`mimkit.data.sample.Mask`).
2. ``RandomCrop(crop_size, cat_max_ratio=0.75)``: a uniform crop of at most ``img_size`` a side,
   redrawn up to 10 times until no single class covers 75% or more of its labelled pixels.
3. ``RandomFlip(prob=0.5)``, horizontal.
4. Normalise with the encoder's statistics, then ``Pad`` to ``img_size x img_size`` at the bottom
   and right: the image with 0 (the mean colour, as the padding follows normalisation) and the
   mask with the ignore label, so padded pixels never reach the loss.

``PhotoMetricDistortion`` (random brightness, contrast, saturation and hue), the pipeline's fifth
step, is left out: it does not move pixels, and a frozen-feature probe depends on it far less
than on the geometry.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mimkit.data.transforms import Normalization, ToChannels
from mimkit.eval.seg_data import IGNORE_INDEX

RATIO_RANGE = (0.5, 2.0)
LONG_SIDE_FACTOR = 4  # mmseg's img_scale (2048, 512): the long side may reach 4x the short one
CAT_MAX_RATIO = 0.75
CROP_TRIES = 10


def _mask_of(flat_inputs: list[Any]) -> torch.Tensor | None:
    return next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)


class RandomRescale(v2.Transform):
    """Rescale, aspect kept, so the shorter side is ``size x r``, r ~ U(``ratio_range``).

    The longer side is capped at ``LONG_SIDE_FACTOR x size x r`` (mmseg's ``keep_ratio`` resize to
    ``img_scale = (2048, 512) x r``). Images resize bilinearly, masks by nearest neighbour.
    """

    def __init__(self, size: int, ratio_range: tuple[float, float] = RATIO_RANGE):
        super().__init__()
        self.size = size
        self.ratio_range = ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        r = torch.empty(1).uniform_(*self.ratio_range).item()
        scale = min(self.size * r / min(h, w), LONG_SIDE_FACTOR * self.size * r / max(h, w))
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )


class ClassBalancedCrop(v2.Transform):
    """A uniform crop of at most ``size x size``, redrawn while one class dominates it.

    mmseg's ``RandomCrop(cat_max_ratio=0.75)``: a crop is kept when its labelled (non-ignored)
    pixels hold at least two classes and the largest covers less than ``cat_max_ratio`` of them;
    after ``CROP_TRIES`` rejected draws the next draw is kept whatever it holds. A side shorter
    than ``size`` is kept whole (:class:`PadTo` fills it up afterwards).
    """

    def __init__(self, size: int, cat_max_ratio: float = CAT_MAX_RATIO, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size = size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        top = int(torch.randint(0, max(h - self.size, 0) + 1, (1,)))
        left = int(torch.randint(0, max(w - self.size, 0) + 1, (1,)))
        return top, left, min(h, self.size), min(w, self.size)

    def _balanced(self, mask: torch.Tensor, box: tuple[int, int, int, int]) -> bool:
        top, left, height, width = box
        crop = mask[..., top : top + height, left : left + width]
        counts = torch.bincount(crop[crop != self.ignore_index].reshape(-1).long())
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        box = self._draw(h, w)
        mask = _mask_of(flat_inputs)
        if mask is not None and self.cat_max_ratio < 1:
            plain = mask.as_subclass(torch.Tensor)
            for _ in range(CROP_TRIES):
                if self._balanced(plain, box):
                    break
                box = self._draw(h, w)
        return dict(zip(("top", "left", "height", "width"), box))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PadTo(v2.Transform):
    """Pad at the bottom and right to ``size x size``: images with 0, masks with ``ignore_index``."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size = size
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size - w, 0), max(self.size - h, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill)


def seg_probe_transform(img_size: int, norm: Normalization | None = None) -> v2.Compose:
    """DINOv2's (mmseg's) training pipeline at ``img_size``; see the module docstring.

    ``norm`` is the encoder's input normalisation (ImageNet's RGB statistics by default).
    """
    norm = norm or Normalization()
    return v2.Compose(
        [
            ToChannels(norm.channels),
            RandomRescale(img_size),
            ClassBalancedCrop(img_size),
            v2.RandomHorizontalFlip(),
            *norm.transforms(),
            PadTo(img_size),
        ]
    )
