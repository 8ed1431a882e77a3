"""Writing webdataset tar shards from any mimkit source: shuffled, resumable, indexed.

A shard set in ``OUT_DIR`` is::

    OUT_DIR/train-000000.tar ...   shard i: write positions [i * shard_size, (i + 1) * shard_size)
    OUT_DIR/train-index.json       format, shard names and sample counts, class names, members, options

Each sample is a group of tar members sharing the key ``%09d`` (its index in the source), written
by webdataset's :class:`~webdataset.TarWriter` in sorted order: ``KEY.cls`` (the label as decimal
text, where the source has labels), ``KEY.png`` or ``KEY.jpg`` (the RGB image) and ``KEY.seg.png``
(the class mask as 8-bit grey, where the source has masks). The index lists under ``members`` the
members every sample has, so a reader can tell a whole sample from the part of one that a
truncated shard leaves. A folder image already in the requested format (and not to be shrunk) is
copied byte for byte.

Order. Samples are written in a random order drawn from ``seed`` (default 0). A reader draws its
batches from a shuffle buffer about a shard deep, so the order inside the shards decides what a
batch can mix: a class-ordered source (an image folder lists its images class by class) written
in order gives shards of one or two classes, and batches of a few classes instead of many.
``keep_order`` writes the source's own order (e.g. to compare a split sample by sample); the
index records the choice as ``options.order`` (``"shuffled"`` or ``"source"``) and
``options.seed``.

Resuming. A shard is written to a temporary name and renamed when complete, so a file under a
shard's final name is always whole. Shard ``i`` holds a fixed set of source samples (the write
order depends on the seed alone) and the tar headers carry no time stamps or owners, so an
interrupted run started again keeps the shards already there and ends with the same bytes as an
uninterrupted one. The options of a run are kept in ``.PREFIX-progress.json`` until the index is
written; resuming with different options is an error.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from mimkit.data.bad import BadSampleWarning
from mimkit.data.folder import ImageFolderSource, load_image
from mimkit.files import atomic_write, atomic_write_text

INDEX_FORMAT = "mimkit-wds-v1"
IMAGE_FORMATS = ("png", "jpg")
# The image members a reader accepts: what this writer makes, and what other webdataset tools do.
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
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
    order: str
    seed: int | None


def write_order(samples: int, seed: int | None) -> list[int]:
    """The source indices in the order they are written: shuffled from ``seed``, or as they are (None)."""
    order = list(range(samples))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


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


_SUFFIXES = {"png": (".png",), "jpg": (".jpg", ".jpeg")}


def _file_as_is(path: str, options: ShardOptions) -> bytes | None:
    """A folder image's file bytes where they already are what the shard needs, else None."""
    if options.max_side is not None or not path.lower().endswith(_SUFFIXES[options.image_format]):
        return None
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # reads the headers and structure, not the pixels: cheap
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        return None  # decoding it in full reports it
    return data


def _skip(index: int, err: Exception) -> None:
    warnings.warn(f"source sample {index} skipped: {err}", BadSampleWarning, stacklevel=3)


def _folder_sample(folder: ImageFolderSource, index: int, options: ShardOptions) -> dict[str, Any] | None:
    """One folder image as tar members, read by path.

    Not through ``folder[index]``: the folder source puts the next readable image in place of an
    undecodable one, which would write that image twice; a shard set leaves the bad one out.
    """
    path, label = folder.samples[index]
    data = _file_as_is(path, options)
    if data is None:
        try:
            data = encode_image(load_image(path), options.image_format, options.max_side)
        except ValueError as err:
            _skip(index, err)
            return None
    sample = {options.image_format: data}
    if label is not None:
        sample["cls"] = str(label).encode()
    return sample


def _source_sample(dataset: Dataset, index: int, options: ShardOptions) -> dict[str, Any] | None:
    """One decoded sample of any source, encoded as tar members."""
    try:
        decoded = dataset[index]
    except ValueError as err:  # an unreadable image in the source: the set goes on without it
        _skip(index, err)
        return None
    image = encode_image(_to_uint8(decoded["image"]), options.image_format, options.max_side)
    sample = {options.image_format: image}
    if "label" in decoded:
        sample["cls"] = str(int(decoded["label"])).encode()
    if "mask" in decoded:
        sample["seg.png"] = _encode_mask(decoded["mask"], options.max_side)
    return sample


def _write_shard(path: Path, dataset: Dataset, indices: list[int], options: ShardOptions) -> tuple[int, set]:
    """Write one shard of the source samples ``indices``; its sample count and common members."""
    members: list[set[str]] = []

    def fill(tmp: Path) -> None:
        # an open file, not a name: webdataset would parse a name as a URL ("a:b/x.tar" has a scheme)
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="", group="") as sink:
            for index in indices:
                if isinstance(dataset, ImageFolderSource):
                    sample = _folder_sample(dataset, index, options)
                else:
                    sample = _source_sample(dataset, index, options)
                if sample is not None:
                    sink.write({"__key__": f"{index:09d}", **sample})
                    members.append(set(sample))

    atomic_write(path, fill)
    return len(members), set.intersection(*members) if members else set()


def close_stream(source: dict[str, Any]) -> OSError | None:
    """Close the stream webdataset's URL opener left in ``source``; return the error closing reports.

    For a ``pipe:`` or http(s) shard the stream is a process's output (the command, or curl), and
    closing it reports that process's exit status: how a failed download explains itself.
    """
    stream = source.get("stream")
    if stream is None:
        return None
    try:
        stream.close()
    except OSError as err:
        return err
    return None


def shard_contents(url: str) -> tuple[int, set[str]]:
    """The samples in a shard (key groups with an image) and the members every one of them has.

    Any location webdataset opens (a path, ``file:``, ``pipe:``, ``http://`` ...); the shard is read
    through, so this costs a full read where an index would give the count for free. A shard that
    cannot be read raises (``OSError``, ``tarfile.ReadError``).
    """
    count, common = 0, None
    source = {"url": url}
    try:
        for sample in wds.tarfile_samples([source]):
            members = {k for k in sample if not k.startswith("__")}
            if members.isdisjoint(IMAGE_MEMBERS):
                continue
            count += 1
            common = members if common is None else common & members
    except BaseException:
        close_stream(source)
        raise
    error = close_stream(source)
    if error is not None:
        raise error
    return count, common or set()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _check_resume(out: Path, prefix: str, options: ShardOptions) -> Path:
    """Refuse to continue a shard set written with other options; return the progress file."""
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
    return progress_file


def write_shards(
    source: str,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    split: str = "train",
    prefix: str | None = None,
    image_format: str = "png",
    max_side: int | None = None,
    seed: int = 0,
    keep_order: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``source`` (a URI such as ``folder:/data/imagenet``) as tar shards; return the index.

    ``shard_size`` is samples per shard (the last shard holds the rest), ``prefix`` names the files
    (default: the split), ``image_format`` is ``png`` (lossless) or ``jpg`` (quality 95) and
    ``max_side`` re-encodes images whose longer side exceeds it, keeping the aspect ratio. Samples
    are written in a random order drawn from ``seed``, or in the source's order with ``keep_order``.
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
    n = len(dataset)
    options = ShardOptions(
        source,
        split,
        shard_size,
        image_format,
        max_side,
        n,
        order="source" if keep_order else "shuffled",
        seed=None if keep_order else seed,
    )
    progress_file = _check_resume(out, prefix, options)

    order = write_order(n, options.seed)
    shards, common = [], None
    bar = tqdm(
        total=n, desc=f"shards {out.name}/{prefix}", unit="img", disable=not progress, dynamic_ncols=True
    )
    for number, start in enumerate(range(0, n, shard_size)):
        indices = order[start : start + shard_size]
        path = out / shard_name(prefix, number)
        if path.is_file():  # a complete shard from an interrupted run stays as it is
            samples, members = shard_contents(str(path.absolute()))
        else:
            samples, members = _write_shard(path, dataset, indices, options)
        if samples:
            common = members if common is None else common & members
        shards.append({"name": path.name, "samples": samples})
        bar.update(len(indices))
    bar.close()

    index = {
        "format": INDEX_FORMAT,
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "class_names": list(getattr(dataset, "class_names", []) or []),
        "members": sorted(common or ()),
        "options": asdict(options),
    }
    _write_json(out / index_name(prefix), index)
    progress_file.unlink(missing_ok=True)
    return index
