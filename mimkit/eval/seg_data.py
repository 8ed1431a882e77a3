"""Labelled segmentation sources for in-context evaluation, their transforms and patch labels.

Sources (registered as URI schemes for :func:`mimkit.data.build_source`):

- ``synthetic:shapes``: its masks, 8 classes (0 background, k + 1 = shape k), nothing ignored.
- ``synthetic:textures``: its masks, 4 classes (0 the smooth background, k + 1 = coarseness k),
  nothing ignored.
- ``voc:PATH``: Pascal VOC 2012, ``PATH`` = the ``VOC2012`` folder (or a folder holding
  ``VOC2012/`` or ``VOCdevkit/VOC2012/``): ``JPEGImages/<id>.jpg``, masks ``SegmentationClass/<id>.png``
  (palette PNGs of class indices) or ``SegmentationClassAug/<id>.png``; split lists
  ``ImageSets/Segmentation/{train,val}.txt``, with ``trainaug.txt`` preferred for train when present
  (10,582 images). 21 classes with background; 255 (object boundaries, "void") is ignored.
- ``ade20k:PATH``: ADEChallengeData2016, ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``. Annotation 0 ("other") is ignored; classes 1..150
  become 0..149 (their 0 becomes 255, the ignore label), so mIoU averages the 150 real classes.

Every sample is ``{"image", "mask"}`` with the mask's ignored pixels at :data:`IGNORE_INDEX`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mimkit.data import SyntheticShapes, build_source, load_image
from mimkit.data.sample import Transform, check_split, make_sample
from mimkit.data.sources import register_scheme
from mimkit.data.synthetic import SHAPES
from mimkit.data.transforms import Normalization, ToChannels

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
ADE20K_NUM_CLASSES = 150
SEG_TRANSFORMS = ("memory", "val")
# The memory's random crop: area fraction and aspect range of torchvision's RandomResizedCrop.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _load_mask(path: Path) -> torch.Tensor:
    """A class-index PNG as uint8 (H, W); palette PNGs keep their indices (no RGB conversion)."""
    try:
        with Image.open(path) as img:
            arr = np.array(img)
    except Exception as err:  # PIL raises several types depending on the codec
        raise ValueError(f"cannot decode mask file {path}: {err}") from err
    if arr.ndim != 2:
        raise ValueError(f"mask file {path} is not a single-channel class-index image (shape {arr.shape})")
    return torch.from_numpy(arr.astype(np.uint8))


class SegmentationFolder(Dataset):
    """Pairs (image file, mask file) with a mask remapping; see the module docstring."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        class_names: tuple[str, ...],
        transform: Transform | None,
        shift: int = 0,
        name: str = "",
    ):
        if not pairs:
            raise ValueError(f"{name}: no image/mask pairs found")
        self.pairs = pairs
        self.seg_class_names = class_names
        self.ignore_index = IGNORE_INDEX
        self.transform = transform
        self.shift = shift
        self.name = name

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        mask = _load_mask(mask_path)
        if self.shift:  # ADE20K: 0 (other) -> 255 (ignored), 1..150 -> 0..149, in uint8 arithmetic
            mask = mask - self.shift
        image = load_image(image_path)
        if image.shape[1:] != mask.shape:
            raise ValueError(
                f"image {image_path} {tuple(image.shape[1:])} and mask {mask_path} differ in size"
            )
        return make_sample(image, mask=mask, transform=self.transform)

    def __repr__(self) -> str:
        return f"SegmentationFolder({self.name!r}, images={len(self)})"


def _voc_root(path: Path) -> Path:
    for root in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (root / "JPEGImages").is_dir():
            return root
    raise FileNotFoundError(
        f"voc:{path}: no JPEGImages/ under {path}, {path}/VOC2012 or {path}/VOCdevkit/VOC2012"
    )


@register_scheme("voc")
def _voc(spec: str, split: str, transform: Transform | None) -> Dataset:
    check_split(split)
    if not spec:
        raise ValueError("voc: needs a path, e.g. voc:/data/VOCdevkit/VOC2012")
    root = _voc_root(Path(spec).expanduser())
    lists = root / "ImageSets" / "Segmentation"
    names = ["trainaug.txt", "train.txt"] if split == "train" else ["val.txt"]
    listing = next((lists / n for n in names if (lists / n).is_file()), None)
    if listing is None:
        raise FileNotFoundError(f"voc:{spec}: none of {', '.join(names)} in {lists}")
    pairs = []
    for line in listing.read_text().split():
        image = root / "JPEGImages" / f"{line}.jpg"
        masks = [root / d / f"{line}.png" for d in ("SegmentationClass", "SegmentationClassAug")]
        mask = next((m for m in masks if m.is_file()), None)
        if mask is None:
            raise FileNotFoundError(
                f"voc:{spec}: no mask for {line} in SegmentationClass/ or SegmentationClassAug/"
            )
        pairs.append((image, mask))
    return SegmentationFolder(pairs, VOC_CLASSES, transform, name=f"voc:{spec} [{listing.name}]")


@register_scheme("ade20k")
def _ade20k(spec: str, split: str, transform: Transform | None) -> Dataset:
    check_split(split)
    if not spec:
        raise ValueError("ade20k: needs a path, e.g. ade20k:/data/ADEChallengeData2016")
    root = Path(spec).expanduser()
    sub = {"train": "training", "val": "validation"}[split]
    images, annotations = root / "images" / sub, root / "annotations" / sub
    if not images.is_dir() or not annotations.is_dir():
        raise FileNotFoundError(f"ade20k:{spec}: expected {images} and {annotations}")
    pairs = []
    for name in sorted(os.listdir(images)):
        if name.startswith(".") or not name.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        mask = annotations / f"{Path(name).stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"ade20k:{spec}: no annotation {mask} for image {name}")
        pairs.append((images / name, mask))
    classes = tuple(f"class{i}" for i in range(1, ADE20K_NUM_CLASSES + 1))  # ADE's ids 1..150
    return SegmentationFolder(pairs, classes, transform, shift=1, name=f"ade20k:{spec}")


def seg_classes(dataset: Dataset, uri: str) -> tuple[tuple[str, ...], int | None]:
    """``(class names, ignore label or None)`` of a segmentation source."""
    if isinstance(dataset, SyntheticShapes):
        return ("background", *SHAPES), None
    names = getattr(dataset, "seg_class_names", None)
    if names is None:
        raise ValueError(
            f"source {uri!r} has no segmentation classes; in-context segmentation reads synthetic:shapes, "
            "synthetic:textures, voc:PATH or ade20k:PATH"
        )
    return tuple(names), dataset.ignore_index


def seg_transform(kind: str, img_size: int, norm: Normalization | None = None) -> v2.Compose:
    """``memory``: random resized crop (area 0.5-1, aspect 3/4-4/3) + flip; ``val``: resize to a square.

    Both end at ``img_size x img_size``, normalised with ``norm`` (the encoder's input
    normalisation; ImageNet's RGB statistics by default); the image resizes bilinearly
    (antialiased), the mask with pixel-centre nearest neighbours. ``val`` does not keep the aspect
    ratio and scores at this resolution (open-hummingbird-eval's convention).
    """
    norm = norm or Normalization()
    tail = norm.transforms()
    bilinear = v2.InterpolationMode.BILINEAR
    if kind == "memory":
        crop = v2.RandomResizedCrop(img_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=bilinear)
        return v2.Compose([ToChannels(norm.channels), crop, v2.RandomHorizontalFlip(), *tail])
    if kind == "val":
        resize = v2.Resize((img_size, img_size), interpolation=bilinear)
        return v2.Compose([ToChannels(norm.channels), resize, *tail])
    raise ValueError(f"unknown segmentation transform {kind!r}; valid: {', '.join(SEG_TRANSFORMS)}")


def seg_source(
    uri: str, split: str, kind: str, img_size: int, norm: Normalization | None = None
) -> tuple[Dataset, tuple[str, ...], int | None]:
    """``uri``'s ``split`` under :func:`seg_transform` ``kind``, its class names and ignore label."""
    dataset = build_source(uri, split, seg_transform(kind, img_size, norm))
    if len(dataset) == 0:
        raise ValueError(f"source {uri!r} has no samples in its {split} split")
    names, ignore = seg_classes(dataset, uri)
    return dataset, names, ignore


def patch_class_fractions(
    masks: torch.Tensor, patch_size: int, num_classes: int, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch class fractions of masks (B, H, W): ``(fractions (B, N, C), valid (B, N))``.

    A patch's fractions are the share of each class among its non-ignored pixels (they sum to 1);
    a patch whose pixels are all ignored has zeros and ``valid`` False. Patches are row-major, as
    the encoder's tokens. Counting is one ``bincount``, never a (B, H, W, C) one-hot.
    """
    b, h, w = masks.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    masks = masks.long()
    keep = masks != ignore_index if ignore_index is not None else torch.ones_like(masks, dtype=torch.bool)
    bad = keep & ((masks < 0) | (masks >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"mask value {int(masks[bad][0])} is outside the classes 0..{num_classes - 1} and is not the "
            f"ignore label {ignore_index}"
        )
    rows = torch.arange(h, device=masks.device) // patch_size
    cols = torch.arange(w, device=masks.device) // patch_size
    patch = (rows[:, None] * gw + cols[None, :]).expand(b, h, w)
    image = torch.arange(b, device=masks.device)[:, None, None] * (gh * gw)
    flat = ((image + patch) * num_classes + masks)[keep]
    counts = torch.bincount(flat, minlength=b * gh * gw * num_classes).view(b, gh * gw, num_classes).float()
    total = counts.sum(-1)
    return counts / total.clamp(min=1)[..., None], total > 0
