"""The ``folder:PATH`` source: a folder of images, labelled by class folders or unlabelled.

Layout. A folder is *labelled* when it holds only folders, no image directly: each folder is a
class (``PATH/<class>/<image>``, images may nest below their class folder), class names are the
sorted folder names and a sample's label is its class's index. A folder with any image directly
in it is *unlabelled*: every image below it, at any depth, is read and samples carry no ``label``
(``class_names`` is empty), which is what pretraining on one's own images needs. Where PATH holds
``train/`` or ``val/``, the split picks that subfolder; the layout and the classes are decided over
both, so the two splits yield the same keys and a label means the same class in either split.
Otherwise PATH itself serves both splits.

Files. Hidden files and folders (a name starting with '.') are skipped silently; files without an
image extension (a README, notes, label CSVs) are skipped with one summary warning per folder.

Damage. An image that fails to decode (a truncated or garbage file, a zero-byte file, a file deleted
after the scan) is not fatal: it is counted as bad in :attr:`ImageFolderSource.counts` with a
:class:`~mimkit.data.bad.BadSampleWarning` naming it, and an image drawn at random (seeded by the
index, so the same whatever the workers) is read in its place, so batches stay full and the
sampler's epoch stays exact. The trainer stops only when bad images pass ``data.max_bad_fraction``
of those read.

Modes. Every image comes out RGB uint8 (the transforms then bring it to ``data.channels``): alpha is
dropped (a pixel keeps its stored colour), palettes are expanded, and 16-bit greyscale is scaled to
8 bits (PIL's own conversion clips it at 255 instead).

Decoding. PIL decodes every format; a whole greyscale or colour JPEG (ImageNet's format) is decoded
by torchvision's libjpeg-turbo straight into a tensor instead, with the same pixels, in two
thirds of the time.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from mimkit.data.bad import SampleCounts
from mimkit.data.sample import SPLITS, Transform, check_split, make_sample

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# Replacements tried for an undecodable image: all of them failing means (unless nearly every file
# is damaged) that the folder itself is unreadable (unmounted, permissions), which skipping cannot fix.
MAX_REPLACEMENTS = 32
# Greyscale modes wider than 8 bits: 16-bit PNGs and TIFFs open as I;16 (or I in older Pillow).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"

Sample = tuple[str, int | None]


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> torch.Tensor:
    """Decode an image file, or an encoded image's bytes, to RGB uint8 (3, H, W); an image that
    fails raises a ValueError naming it (``name``, else the path).

    The pixels are decoded in full here, so a file cut short fails now rather than decoding
    partially: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False for that (mimkit never sets
    it; :func:`_warn_if_truncated_images_load` says so when other code has).
    """
    _warn_if_truncated_images_load()
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    try:
        data = bytes(source) if is_bytes else Path(source).read_bytes()
        fast = _whole_jpeg(data)
        if fast is not None:
            return fast
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            # read out before the file closes: an RGB image is ``img`` itself
            return _rgb_tensor(_to_rgb(img))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        what = name or ("image bytes" if is_bytes else f"image file {source}")
        raise ValueError(f"cannot decode {what}: {err}") from err


def read_or_replace(index: int, length: int, read: Callable[[int], Any], counts: SampleCounts, where: str):
    """``read(index)``, or where it raises a ValueError (an image that does not decode), ``read`` of
    a replacement: up to :data:`MAX_REPLACEMENTS` indices drawn from a generator seeded by ``index``
    alone, so an epoch reads the same images whatever the workers, and a run of damaged neighbours
    (a folder copied halfway) costs no more than scattered damage. Every failed attempt counts as
    bad in ``counts``, which keeps ``bad / (good + bad)`` the share of damaged images. ``where``
    names the image at ``index`` in the error raised when no candidate decodes.
    """
    draw = random.Random(index)
    for attempt in range(1 + MAX_REPLACEMENTS):
        try:
            value = read(index if attempt == 0 else draw.randrange(length))
        except ValueError as err:
            counts.skipped(1, f"{err}; skipped, an image drawn at random is read in its place")
            continue
        counts.delivered()
        return value
    raise ValueError(
        f"none of {1 + MAX_REPLACEMENTS} images tried for {where} (it and {MAX_REPLACEMENTS} drawn at "
        "random) can be decoded; is the data readable? (the warnings above name each image)"
    )


def _whole_jpeg(data: bytes) -> torch.Tensor | None:
    """A JPEG of 1 or 3 channels decoded by torchvision's libjpeg-turbo straight into a (3, H, W)
    tensor, in two thirds of the time of PIL and the copy out of it, with the same pixels; None for
    anything else, which PIL then decodes or rejects: not a JPEG, a file not ending in its
    end-of-image marker (cut short, so that PIL's verdict on damage stays the only one), CMYK
    (PIL's conversion is the reference), or a decoding error."""
    if not (data.startswith(_JPEG_START) and data.endswith(_JPEG_END)):
        return None
    try:
        image = decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED
        )
    except RuntimeError:
        return None
    if image.shape[0] == 1:  # greyscale, replicated as PIL's L -> RGB does
        return image.expand(3, -1, -1).contiguous()
    return image if image.shape[0] == 3 else None


def _rgb_tensor(rgb: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as uint8 (3, H, W), as torchvision's ``pil_to_tensor`` gives them (the
    same values and channels-last strides), from one ``tobytes`` copied once: a quarter less time."""
    width, height = rgb.size
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1)


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, scaling wide greyscale and expanding palettes through their alpha; an
    RGB image as it is (``convert`` would copy it)."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY_MODES:
        return _wide_grey_to_l(img).convert("RGB")
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        # via RGBA: PIL warns when it drops a palette's transparency straight to RGB
        img = img.convert("RGBA")
    return img.convert("RGB")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit greyscale (0..65535) to 8 bits, rounded: ``v * 255 / 65535`` is exactly ``v / 257``."""
    wide = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((wide + 128) // 257).astype(np.uint8))


def _warn_if_truncated_images_load() -> None:
    """Say (once per process, by the warning filter) that truncated files will pass as good."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set outside mimkit): truncated images decode "
            "partially, padded with grey, and are not counted as bad samples",
            stacklevel=2,
        )


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _direct_image(folder: Path) -> str | None:
    """The first image file directly in ``folder``, or None."""
    for name in _visible(os.listdir(folder)):
        if _is_image_name(name) and not (folder / name).is_dir():
            return name
    return None


def _subfolders(folder: Path) -> list[str]:
    return [name for name in _visible(os.listdir(folder)) if (folder / name).is_dir()]


def _layout(folders: list[Path]) -> tuple[list[str], str | None]:
    """The class names of ``folders`` (one layout for all splits) and, if unlabelled, why.

    Labelled needs every folder to hold no image directly: one image beside the class folders
    would have no class, and quietly dropping it would hide data the user put there.
    """
    for folder in folders:
        image = _direct_image(folder)
        if image is not None:
            reason = (
                f"images sit directly in {folder} (e.g. {image}); a labelled folder holds only class "
                f"folders, {folder}/<class>/<image>"
            )
            return [], reason
    return sorted({name for folder in folders for name in _subfolders(folder)}), None


class _Scan:
    """The images under a folder, in sorted order, and the non-image files passed over."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.ignored = 0
        self.ignored_example: str | None = None

    def walk(self, folder: Path, label: int | None) -> None:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = _visible(dirnames)
            for filename in _visible(filenames):
                path = os.path.join(dirpath, filename)
                if _is_image_name(filename):
                    self.samples.append((path, label))
                else:
                    self.ignore(path)

    def ignore(self, path: str) -> None:
        self.ignored += 1
        self.ignored_example = self.ignored_example or path

    def note_ignored(self, root: Path) -> None:
        """One warning for all the non-image files met (they are no error: READMEs, label lists...)."""
        if self.ignored:
            files = "file" if self.ignored == 1 else "files"
            warnings.warn(
                f"ignored {self.ignored} non-image {files} in {root} (e.g. "
                f"{os.path.relpath(self.ignored_example, root)}); image extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}",
                stacklevel=3,
            )


def _scan(root: Path, class_names: list[str]) -> _Scan:
    """Every image under ``root``: by class folder when labelled, the whole tree when not."""
    scan = _Scan()
    if not class_names:
        scan.walk(root, None)
        return scan
    for label, name in enumerate(class_names):
        if (root / name).is_dir():  # else a class present in the other split only
            scan.walk(root / name, label)
    for name in _visible(os.listdir(root)):
        if not (root / name).is_dir():  # beside the class folders, so no image (see _layout)
            scan.ignore(str(root / name))
    return scan


class ImageFolderSource(Dataset):
    """Map-style dataset over an image folder: samples ``{"image", "label"}``, or ``{"image"}`` unlabelled.

    Attributes:
        class_names: the sorted class folder names; empty for an unlabelled folder.
        samples: ``(path, label)`` per image in index order, ``label`` None when unlabelled.
        unlabelled_reason: why the folder reads without labels (None when labelled).
        counts: images delivered and images skipped as undecodable, shared with loader workers.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", transform: Transform | None = None):
        check_split(split)
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"image folder {path} does not exist or is not a directory")
        split_dirs = [path / s for s in SPLITS if (path / s).is_dir()]
        if split_dirs:
            self.root = path / split
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"image folder {path} has {split_dirs[0].name}/ but no {split}/ folder"
                )
        else:
            self.root = path
        self.class_names, self.unlabelled_reason = _layout(split_dirs or [path])
        self.split = split
        self.transform = transform
        scan = _scan(self.root, self.class_names)
        scan.note_ignored(self.root)
        self.samples = scan.samples
        if not self.samples:
            raise ValueError(
                f"no images found in {self.root}; expected images with one of the extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}, in {self.root}/<class>/ for labels"
            )
        self.counts = SampleCounts()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} images")
        image, label = self._decode_from(index % n)
        return make_sample(image, label=label, transform=self.transform)

    def _decode_from(self, index: int) -> tuple[torch.Tensor, int | None]:
        """The image and label at ``index``, or, where it fails to decode, of a replacement
        (:func:`read_or_replace`)."""

        def read(i: int) -> tuple[torch.Tensor, int | None]:
            path, label = self.samples[i]
            return load_image(path), label

        where = f"index {index} of {self.root} ({self.samples[index][0]})"
        return read_or_replace(index, len(self.samples), read, self.counts, where)

    def __repr__(self) -> str:
        classes = f"classes={len(self.class_names)}" if self.class_names else "unlabelled"
        return f"ImageFolderSource({str(self.root)!r}, {classes}, images={len(self)})"
