"""The ``hf:PATH`` source: a Hugging Face ``datasets`` dataset saved on local disk, never downloaded.

PATH is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` and is read
with ``datasets.load_from_disk`` (memory-mapped Arrow files, which DataLoader workers share). A
``DatasetDict`` gives mimkit's ``train`` split from its ``train`` entry and ``val`` from the first of
``validation``, ``val``, ``test`` it holds; a single ``Dataset`` serves both splits, as a folder
without ``train/`` and ``val/`` does.

Columns: the image is the first ``datasets.Image`` column (``?image=NAME`` picks one) and the label
the first ``ClassLabel`` column, whose names become ``class_names`` (``?label=NAME`` picks one,
``?label=none`` reads the set unlabelled, as a set without one reads). mimkit decodes the stored
bytes itself, as ``folder:`` decodes files (RGB uint8; alpha dropped, palettes expanded, 16-bit grey
scaled), so an image that does not decode is counted bad, named in a warning and replaced by one
drawn at random, and the trainer stops only past ``data.max_bad_fraction``.

Needs the optional ``datasets`` package (``pip install datasets``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch.utils.data import Dataset

from mimkit.data.bad import SampleCounts
from mimkit.data.folder import load_image, read_or_replace
from mimkit.data.sample import Transform, check_split, make_sample
from mimkit.data.sources import register_scheme

VAL_SPLIT_NAMES = ("validation", "val", "test")
OPTIONS = ("image", "label")


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "hf: sources need the Hugging Face datasets package: pip install datasets "
            "(or pip install 'mimkit[hf]')"
        ) from err
    return datasets


def _pick_split(loaded: Any, split: str, path: Path) -> Any:
    datasets = _datasets()
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    names = ("train",) if split == "train" else VAL_SPLIT_NAMES
    for name in names:
        if name in loaded:
            return loaded[name]
    raise ValueError(
        f"hf:{path} has the splits {', '.join(loaded)}, none of them {' or '.join(names)} for mimkit's "
        f"{split!r} split"
    )


def _column(features: dict[str, Any], wanted: str | None, kind: type, what: str, path: Path) -> str | None:
    """The column of feature type ``kind``: ``wanted`` (checked) or the first such one."""
    of_kind = [name for name, feature in features.items() if isinstance(feature, kind)]
    if wanted is None:
        return of_kind[0] if of_kind else None
    if wanted not in features:
        raise ValueError(f"hf:{path} has no column {wanted!r} ({what}); its columns: {', '.join(features)}")
    if not isinstance(features[wanted], kind):
        raise ValueError(
            f"hf:{path} column {wanted!r} is {type(features[wanted]).__name__}, not {kind.__name__} "
            f"({what}); its {kind.__name__} columns: {', '.join(of_kind) or 'none'}"
        )
    return wanted


class HuggingFaceSource(Dataset):
    """Map-style dataset over a locally saved ``datasets`` split: ``{"image", "label"}`` or ``{"image"}``.

    Attributes:
        class_names: the label column's ``ClassLabel`` names; empty when unlabelled.
        image_column, label_column: the columns read (``label_column`` None when unlabelled).
        counts: images delivered and images skipped as undecodable, shared with loader workers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        transform: Transform | None = None,
        image: str | None = None,
        label: str | None = None,
    ):
        check_split(split)
        datasets = _datasets()
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"hf:{self.path} is not a directory; hf: reads a dataset written by save_to_disk "
                "(it never downloads)"
            )
        try:
            loaded = datasets.load_from_disk(str(self.path))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"hf:{self.path} holds no dataset written by Dataset.save_to_disk or "
                f"DatasetDict.save_to_disk ({err})"
            ) from err
        data = _pick_split(loaded, split, self.path)
        features = dict(data.features)
        self.image_column = _column(features, image, datasets.Image, "image", self.path)
        if self.image_column is None:
            raise ValueError(
                f"hf:{self.path} has no Image column (its columns: {', '.join(features)}); name one with "
                "?image=NAME"
            )
        unlabelled = label is not None and label.lower() == "none"
        self.label_column = (
            None if unlabelled else _column(features, label, datasets.ClassLabel, "label", self.path)
        )
        self.class_names = list(features[self.label_column].names) if self.label_column else []
        columns = [c for c in (self.image_column, self.label_column) if c]
        # the stored bytes, decoded here: datasets' own decoding would raise on a damaged image
        self.data = data.select_columns(columns).cast_column(self.image_column, datasets.Image(decode=False))
        if not len(self.data):
            raise ValueError(f"hf:{self.path} ({split} split) holds no samples")
        self.split = split
        self.transform = transform
        self.counts = SampleCounts()

    def __len__(self) -> int:
        return len(self.data)

    def _read(self, index: int) -> tuple[torch.Tensor, int | None]:
        row = self.data[index]
        stored = row[self.image_column]
        name = f"image {index} of hf:{self.path} ({self.split})"
        if stored.get("bytes") is not None:
            image = load_image(stored["bytes"], name)
        elif stored.get("path"):
            image = load_image(stored["path"], f"{name}, file {stored['path']}")
        else:
            raise ValueError(f"cannot decode {name}: neither bytes nor a path stored")
        return image, (int(row[self.label_column]) if self.label_column else None)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.data)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} images")
        index %= n
        where = f"image {index} of hf:{self.path} ({self.split})"
        image, label = read_or_replace(index, n, self._read, self.counts, where)
        return make_sample(image, label=label, transform=self.transform)

    def __repr__(self) -> str:
        classes = f"classes={len(self.class_names)}" if self.class_names else "unlabelled"
        return f"HuggingFaceSource('{self.path}', {self.split}, {classes}, images={len(self)})"


def _parse_options(query: str, spec: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):  # as wds: reads its options
        if key not in OPTIONS or not value:
            raise ValueError(
                f"bad option {key}={value!r} in hf:{spec}; valid options: image=NAME, label=NAME|none"
            )
        options[key] = value
    return options


@register_scheme("hf")
def _hf(spec: str, split: str, transform: Transform | None) -> HuggingFaceSource:
    path, _, query = spec.partition("?")
    if not path:
        raise ValueError("hf: needs the directory of a dataset saved with save_to_disk, e.g. hf:/data/my_set")
    return HuggingFaceSource(path, split, transform, **_parse_options(query, spec))
