"""Writing webdataset tar shards from any mimkit source, resumably.

A shard set in ``OUT_DIR`` is::

    OUT_DIR/train-000000.tar ...   samples [i * shard_size, (i + 1) * shard_size) of the source
    OUT_DIR/train-index.json       format, shard names and sample counts, class names, options

A folder image already in the requested format (and not to be shrunk) is copied byte for byte.
Each sample is a group of tar members sharing the key ``%09d`` (its index in the source):
``KEY.png`` or ``KEY.jpg`` (the RGB image), ``KEY.cls`` (the label as decimal text, where the
source has labels) and ``KEY.seg.png`` (the class mask as 8-bit grey, where the source has masks).

A shard is written to ``.NAME.tmp`` and renamed when complete, so a file under a shard's final
name is always whole. Shard ``i`` holds a fixed range of the source, and the tar headers carry no
time stamps or owners, so an interrupted run started again skips the shards already there and
ends with the same bytes as an uninterrupted one. The options of a run are kept in
``.PREFIX-progress.json`` until the index is written; resuming with different options is an error.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from mimkit.data.folder import ImageFolderSource
from mimkit.files import atomic_write, atomic_write_text

INDEX_FORMAT = "mimkit-wds-v1"
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 95


def index_name(prefix: str) -> str:
    """The index file name of a shard set written with ``prefix``."""
    return f"{prefix}-index.json"


def shard_name(prefix: str, number: int) -> str:
    """The file name of shard ``number`` of a set written with ``prefix``."""
    return f"{prefix}-{number:06d}.tar"


@dataclass(frozen=True)
class ShardOptions:
    """The options that decide a shard set's bytes; a resumed run must repeat them."""

    source: str
    split: str
    shard_size: int
    image_format: str
    max_side: int | None
    samples: int


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A source's float image in [0, 1] back to the uint8 (3, H, W) it was decoded from (exactly)."""
    return (image * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _shrink(img: Image.Image, max_side: int | None, resample: Image.Resampling) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, resample)


def encode_image(image: torch.Tensor, image_format: str, max_side: int | None = None) -> bytes:
    """PNG or JPEG bytes of a uint8 RGB image (3, H, W), its longer side cut to ``max_side``."""
    img = _shrink(Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB"), max_side, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_mask(mask: torch.Tensor, max_side: int | None) -> bytes:
    img = _shrink(Image.fromarray(mask.to(torch.uint8).numpy(), "L"), max_side, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444  # no mtime, owner or group: the bytes depend on the content alone
    tar.addfile(info, io.BytesIO(data))


_SUFFIXES = {"png": (".png",), "jpg": (".jpg", ".jpeg")}


def _original_file(dataset: Dataset, index: int, options: ShardOptions) -> bytes | None:
    """A folder image's file bytes where they already are what the shard needs, else None."""
    if not isinstance(dataset, ImageFolderSource) or options.max_side is not None:
        return None
    path = dataset.samples[index][0]
    if not path.lower().endswith(_SUFFIXES[options.image_format]):
        return None
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # reads the headers and structure, not the pixels: cheap
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        return None  # decoding it below reports it
    return data


def _write_shard(path: Path, dataset: Dataset, indices: range, options: ShardOptions) -> list[int]:
    """Write one shard; return the source indices skipped as unreadable."""
    skipped: list[int] = []
    atomic_write(path, lambda tmp: _fill_shard(tmp, dataset, indices, options, skipped))
    return skipped


def _fill_shard(
    tmp: Path, dataset: Dataset, indices: range, options: ShardOptions, skipped: list[int]
) -> None:
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in indices:
            key = f"{index:09d}"
            original = _original_file(dataset, index, options)
            if original is not None:  # the folder's own file, byte for byte: no decode, no loss
                _add(tar, f"{key}.{options.image_format}", original)
                _add(tar, f"{key}.cls", str(dataset.samples[index][1]).encode())
                continue
            try:
                sample = dataset[index]
            except ValueError as err:  # an unreadable image in the source: the set goes on without it
                warnings.warn(f"source sample {index} skipped: {err}", stacklevel=2)
                skipped.append(index)
                continue
            image = encode_image(_to_uint8(sample["image"]), options.image_format, options.max_side)
            _add(tar, f"{key}.{options.image_format}", image)
            if "label" in sample:
                _add(tar, f"{key}.cls", str(int(sample["label"])).encode())
            if "mask" in sample:
                _add(tar, f"{key}.seg.png", _encode_mask(sample["mask"], options.max_side))


def _count_samples(path: Path) -> int:
    with tarfile.open(path, "r") as tar:
        return len({m.name.partition(".")[0] for m in tar if m.name.partition(".")[2] in IMAGE_FORMATS})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def write_shards(
    source: str,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    split: str = "train",
    prefix: str | None = None,
    image_format: str = "png",
    max_side: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``source`` (a URI such as ``folder:/data/imagenet``) as tar shards; return the index.

    ``shard_size`` is samples per shard (the last shard holds the rest), ``prefix`` names the files
    (default: the split), ``image_format`` is ``png`` (lossless) or ``jpg`` (quality 95) and
    ``max_side`` re-encodes images whose longer side exceeds it, keeping the aspect ratio.
    Shards already complete in ``out_dir`` from an interrupted run with the same options are kept.
    """
    from mimkit.data.sources import build_source

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be a positive number of samples")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image_format {image_format!r}; valid: {', '.join(IMAGE_FORMATS)}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side={max_side} must be a positive number of pixels or None")
    dataset = build_source(source, split, transform=None)
    prefix = prefix or split
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    options = ShardOptions(source, split, shard_size, image_format, max_side, len(dataset))

    progress_file = out / f".{prefix}-progress.json"
    index_file = out / index_name(prefix)
    previous = None
    if progress_file.is_file():
        previous = json.loads(progress_file.read_text())
    elif index_file.is_file():
        previous = json.loads(index_file.read_text())["options"]
    now = asdict(options)
    if previous is not None and previous != now:
        changed = sorted(k for k in previous.keys() | now.keys() if previous.get(k) != now.get(k))
        before = {k: previous.get(k) for k in changed}
        after = {k: now.get(k) for k in changed}
        raise ValueError(
            f"{out} holds shards written with other options (before {before}, now {after}); "
            "use another output folder or delete the old shards"
        )
    _write_json(progress_file, now)

    n = len(dataset)
    count = -(-n // shard_size)
    shards = []
    bar = tqdm(
        total=n, desc=f"shards {out.name}/{prefix}", unit="img", disable=not progress, dynamic_ncols=True
    )
    for number in range(count):
        indices = range(number * shard_size, min(n, (number + 1) * shard_size))
        path = out / shard_name(prefix, number)
        if path.is_file():  # a complete shard from an interrupted run stays as it is
            samples = _count_samples(path)
        else:
            samples = len(indices) - len(_write_shard(path, dataset, indices, options))
        shards.append({"name": path.name, "samples": samples})
        bar.update(len(indices))
    bar.close()

    index = {
        "format": INDEX_FORMAT,
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "class_names": list(getattr(dataset, "class_names", []) or []),
        "options": asdict(options),
    }
    _write_json(index_file, index)
    progress_file.unlink(missing_ok=True)
    return index
