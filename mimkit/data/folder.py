"""The ``folder:PATH`` source: images in ImageFolder layout, ``PATH/<class>/<image>``.

Class names are the sorted class folder names and a sample's label is its class's index; images
may sit in nested folders below their class folder. Where PATH holds ``train/`` or ``val/``, the
split picks that subfolder and the classes are the union over both, so a label means the same
class in either split; otherwise PATH itself serves both splits. Hidden files and folders (a name
starting with '.') are skipped; any other file must carry an image extension.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from mimkit.data.sample import SPLITS, Transform, check_split, make_sample

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to RGB uint8 (3, H, W); a file that fails raises a ValueError naming it."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        raise ValueError(f"cannot decode image file {path}: {err}") from err
    return F.pil_to_tensor(rgb)


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _class_folders(root: Path) -> list[str]:
    """Class folder names directly under ``root``; a stray file there is a layout error."""
    classes = []
    for name in _visible(os.listdir(root)):
        if not (root / name).is_dir():
            raise ValueError(
                f"file {root / name} sits directly in {root}; images belong in class folders {root}/<class>/"
            )
        classes.append(name)
    return classes


def _scan(root: Path, class_names: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image under ``root/<class>``, in sorted order."""
    samples = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue  # a class present in the other split only
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = _visible(dirnames)
            for filename in _visible(filenames):
                path = os.path.join(dirpath, filename)
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    raise ValueError(
                        f"{path} is not an image file; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}"
                    )
                samples.append((path, label))
    return samples


class ImageFolderSource(Dataset):
    """Map-style dataset over an image folder: samples ``{"image", "label"}``."""

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
            self.class_names = sorted({c for d in split_dirs for c in _class_folders(d)})
        else:
            self.root = path
            self.class_names = _class_folders(path)
        self.split = split
        self.transform = transform
        self.samples = _scan(self.root, self.class_names)
        if not self.samples:
            raise ValueError(
                f"no images found in {self.root}; expected {self.root}/<class>/<image> with one of the "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, label = self.samples[index]
        return make_sample(load_image(path), label=label, transform=self.transform)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, classes={len(self.class_names)}, images={len(self)})"
