"""The ``wds:`` source: webdataset tar shards as a stream of sample dicts.

Spec forms (after ``wds:``)::

    wds:/data/in1k/train-index.json                    the index tools/make_shards.py writes
    wds:/data/in1k/train-{000000..000127}.tar          brace ranges (and {a,b} lists)
    wds:/a/train-{0..3}.tar,/b/extra-{0..1}.tar        several comma-separated patterns
    wds:...?shuffle=2000&resample=1                    options (defaults: shuffle=1000, resample=0)

Sample counts and class names come from the index; for shard patterns, from a ``*-index.json``
beside the shards that lists them, else by reading the tar headers once.

Iteration splits the shards over ranks (``torch.distributed`` when it is initialised, or
:meth:`WebDatasetSource.configure`) and then over DataLoader workers. Two modes:

- **one pass** (``resample=0``): each epoch the shard list is shuffled from ``(seed, epoch)``, rank
  ``r`` of ``w`` takes every ``w``-th shard, worker ``k`` of ``n`` every ``n``-th of those, so
  every sample is read exactly once per epoch over all ranks and workers;
- **resampled** (``resample=1``): each worker draws shards at random with replacement from its own
  generator seeded by ``(seed, epoch, start, rank, worker)``, forever, or until it has produced its
  share of ``configure(samples=...)``; the trainer uses this mode so every rank sees exactly
  ``steps_per_epoch x global_batch / world_size`` samples per epoch, and a resumed run (``start``
  > 0) continues from a new, seeded position rather than repeating the epoch's start.

In both modes samples pass through a shuffle buffer of ``shuffle`` samples (0: off). A sample is
``{"image", "label", "mask"}`` as from every other source (see :mod:`mimkit.data.sample`).

Bad data never stops the stream: a missing shard, a truncated tar or an image that fails to decode
is skipped with a warning and counted in :attr:`WebDatasetSource.bad_samples` (shared by all
workers); the trainer logs the count and stops only past ``data.max_bad_fraction``.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as F

from mimkit.data.sample import Transform, check_split, make_sample
from mimkit.data.shards import INDEX_FORMAT
from mimkit.data.sources import register_scheme

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
OPTIONS = {"shuffle": 1000, "resample": 0, "seed": 0}


class BadSampleWarning(UserWarning):
    """A sample, a shard or part of a shard was skipped."""


@dataclass(frozen=True)
class Shard:
    """One tar shard: its path and sample count (None where no index gives it)."""

    path: str
    samples: int | None


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the shard index {path}: {err}") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a mimkit shard index (expected format {INDEX_FORMAT!r})")
    return index


def _count_members(path: str) -> int | None:
    """Samples in a tar by reading its headers (None when it cannot be read)."""
    keys = set()
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext.lower() in IMAGE_KEYS:
                    keys.add(key)
    except (OSError, tarfile.TarError, EOFError):
        return None
    return len(keys)


def resolve_shards(spec: str) -> tuple[list[Shard], list[str]]:
    """The shards and class names named by a ``wds:`` spec (without its ``?options``)."""
    if not spec:
        raise ValueError(
            "wds: needs shards, e.g. wds:/data/train-{000000..000127}.tar or wds:/data/train-index.json"
        )
    if spec.endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"shard index {path} not found (tools/make_shards.py writes it)")
        index = _read_index(path)
        shards = [Shard(str(path.parent / s["name"]), int(s["samples"])) for s in index["shards"]]
        return shards, list(index.get("class_names", []))

    paths = [os.path.expanduser(p) for pattern in spec.split(",") if pattern for p in braceexpand(pattern)]
    if not paths:
        raise ValueError(f"wds:{spec} names no shards")
    counts: dict[str, int] = {}
    class_names: list[str] = []
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):
        for index_path in sorted(Path(folder).glob("*-index.json")):
            try:
                index = _read_index(index_path)
            except ValueError:
                continue
            for s in index["shards"]:
                counts[str(index_path.parent / s["name"])] = int(s["samples"])
            class_names = class_names or list(index.get("class_names", []))
    shards = []
    for p in paths:
        n = counts.get(str(Path(p)))
        shards.append(Shard(p, n if n is not None else _count_members(p)))
    if all(s.samples is None for s in shards):
        raise FileNotFoundError(
            f"none of the {len(paths)} shards of wds:{spec} can be read (first: {paths[0]})"
        )
    return shards, class_names


def _parse_options(query: str, spec: str) -> dict[str, int]:
    options = dict(OPTIONS)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OPTIONS:
            raise ValueError(
                f"unknown option {key!r} for wds:{spec}; valid options: "
                + ", ".join(f"{k} (default {v})" for k, v in OPTIONS.items())
            )
        try:
            options[key] = int(value)
        except ValueError as err:
            raise ValueError(f"option {key}={value!r} of wds:{spec} is not an integer") from err
        if options[key] < 0:
            raise ValueError(f"option {key}={value} of wds:{spec} must be >= 0")
    return options


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike hash())."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def _decode_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return F.pil_to_tensor(img.convert("RGB"))


def _decode_mask(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return F.pil_to_tensor(img.convert("L"))[0]


class TruncatedMember(EOFError):
    """A tar stream ends inside the data of the member ``name``."""

    def __init__(self, name: str):
        super().__init__(f"unexpected end of data in tar member {name}")
        self.name = name


def _field(header: bytes, start: int, length: int) -> int:
    text = header[start : start + length].split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream, in order.

    A lean reader for the ustar/GNU/pax tars that webdataset tools write, about twice as fast as
    :mod:`tarfile`'s stream mode on small members; a bad header checksum raises
    ``tarfile.TarError`` and a stream cut short ``EOFError``.
    """
    long_name = None
    while True:
        header = f.read(512)
        if not header or header == bytes(512):
            return  # end-of-archive blocks (or a tar that simply stops at a member boundary)
        if len(header) < 512:
            raise EOFError("unexpected end of data in a tar header")
        checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if checksum != _field(header, 148, 8):
            raise tarfile.TarError("bad tar header checksum")
        size = _field(header, 124, 12)
        data = f.read(size)
        if len(data) < size:
            raise TruncatedMember(long_name or header[:100].split(b"\0", 1)[0].decode())
        f.read(-size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind == b"x":  # pax extended header: may carry the next member's path
            for record in data.decode().splitlines():
                _, _, keyval = record.partition(" ")
                if keyval.startswith("path="):
                    long_name = keyval[5:]
            continue
        if kind in (b"0", b"\0"):
            name = long_name
            if name is None:
                prefix = header[345:500].split(b"\0", 1)[0].decode()
                name = header[:100].split(b"\0", 1)[0].decode()
                name = f"{prefix}/{name}" if prefix else name
            yield name, data
        long_name = None


class WebDatasetSource(IterableDataset):
    """Iterable dataset over tar shards: samples ``{"image", "label", "mask"}`` (see module docs).

    Args:
        shards: the shards, with their sample counts.
        class_names: class names, from the index.
        transform: applied jointly to image and mask, under a per-sample seed.
        shuffle: shuffle buffer size in samples (0: read order).
        resample: draw shards with replacement, endlessly (or up to ``configure(samples=...)``).
        seed: seeds shard order, buffer and augmentations (with the epoch, rank and worker).
    """

    def __init__(
        self,
        shards: list[Shard],
        class_names: list[str] | tuple[str, ...] = (),
        transform: Transform | None = None,
        *,
        shuffle: int = OPTIONS["shuffle"],
        resample: bool = False,
        seed: int = 0,
    ):
        if not shards:
            raise ValueError("WebDatasetSource needs at least one shard")
        self.shards = list(shards)
        self.class_names = list(class_names)
        self.transform = transform
        self.shuffle = shuffle
        self.resample = bool(resample)
        self.seed = seed
        self.epoch, self.start = 0, 0
        self.rank: int | None = None
        self.world_size: int | None = None
        self.samples: int | None = None
        self.batch = 1
        # [samples yielded, samples skipped as bad], shared with the DataLoader's worker processes
        self._counts = multiprocessing.Array("q", 2)

    def __len__(self) -> int:
        """Samples in one pass over all shards: the epoch length."""
        return sum(s.samples or 0 for s in self.shards)

    @property
    def good_samples(self) -> int:
        """Samples yielded so far, by all workers."""
        return int(self._counts[0])

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far (undecodable, in a truncated tar or a missing shard), by all workers."""
        return int(self._counts[1])

    def configure(
        self,
        *,
        epoch: int | None = None,
        start: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int | None = None,
        resample: bool | None = None,
        samples: int | None = None,
        batch: int | None = None,
    ) -> WebDatasetSource:
        """Set the stream position and split for the next iteration; ``None`` keeps a value.

        ``epoch`` and ``start`` (a step or any resume position) seed the stream; ``samples`` caps
        this rank's samples per iteration, split over workers in whole ``batch``-sized groups so
        that a DataLoader with ``batch_size=batch`` sees only full batches.
        """
        for name, value in dict(
            epoch=epoch, start=start, rank=rank, world_size=world_size, seed=seed
        ).items():
            if value is not None:
                setattr(self, name, value)
        if resample is not None:
            self.resample = resample
        if samples is not None:
            self.samples = samples
        if batch is not None:
            self.batch = batch
        return self

    def _place(self) -> tuple[int, int, int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world = 0, 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return rank, world, worker, workers

    def _quota(self, worker: int, workers: int) -> int | None:
        if self.samples is None:
            return None
        batches = self.samples // self.batch
        return len(range(worker, batches, workers)) * self.batch

    def _shard_stream(self, rng: random.Random, rank: int, world: int, worker: int, workers: int):
        if self.resample:
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        if self.shuffle:
            random.Random(_mix(self.seed, self.epoch)).shuffle(order)  # the same order on every rank
        yield from order[rank::world][worker::workers]

    def _bad(self, count: int, message: str) -> None:
        with self._counts.get_lock():
            self._counts[1] += count
        warnings.warn(message, BadSampleWarning, stacklevel=2)

    def _raw_samples(self, shard: Shard) -> Iterator[dict[str, bytes]]:
        """The member groups of one shard, by key; damage is counted and ends the shard."""
        read = 0
        group: dict[str, bytes] = {}
        key = None
        try:
            with open(shard.path, "rb", buffering=1 << 20) as f:
                for name, data in tar_members(f):
                    k, _, ext = os.path.basename(name).partition(".")
                    if k != key and group:  # a new key: the previous sample is whole
                        read += 1
                        yield group
                        group = {}
                    key = k
                    group["__key__"] = f"{os.path.basename(shard.path)}:{k}".encode()
                    group[ext.lower()] = data
            if group:
                read += 1
                yield group
        except FileNotFoundError:
            lost = shard.samples or 1  # a shard no index counts still held something
            self._bad(lost, f"shard {shard.path} is missing; skipped ({lost} samples)")
        except TruncatedMember as err:
            if group and os.path.basename(err.name).partition(".")[0] != key:
                read += 1  # the cut is in the next sample: the one read so far is whole
                yield group
            lost = max(1, (shard.samples or 0) - read)
            self._bad(lost, f"shard {shard.path} is damaged after {read} samples ({err}); skipped {lost}")
        except (OSError, EOFError, tarfile.TarError) as err:
            lost = max(1, (shard.samples or 0) - read)
            self._bad(lost, f"shard {shard.path} is damaged after {read} samples ({err}); skipped {lost}")

    def _decode(self, raw: dict[str, bytes], seed: int) -> dict[str, torch.Tensor] | None:
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        try:
            if image_key is None:
                raise ValueError(f"no image among the members {sorted(raw)}")
            image = _decode_rgb(raw[image_key])
            label = int(raw["cls"].decode()) if "cls" in raw else None
            mask = _decode_mask(raw["seg.png"]) if "seg.png" in raw else None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
            self._bad(1, f"sample {raw['__key__'].decode()} cannot be decoded ({err}); skipped")
            return None
        if self.transform is None:
            return make_sample(image, label=label, mask=mask)
        with torch.random.fork_rng(devices=[]):  # leave the caller's stream (e.g. the masks) alone
            # the CPU generator alone: torch.manual_seed also queues lazy CUDA/XPU seeding (~0.5 ms each)
            torch.default_generator.manual_seed(seed)
            return make_sample(image, label=label, mask=mask, transform=self.transform)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world, worker, workers = self._place()
        quota = self._quota(worker, workers)
        rng = random.Random(_mix(self.seed, self.epoch, self.start, rank, worker))
        buffer: list[dict[str, bytes]] = []
        produced = 0
        if quota == 0:  # fewer batches than workers: this worker has none
            return

        def emit(raw):
            nonlocal produced
            sample = self._decode(raw, rng.getrandbits(63))
            if sample is not None:
                produced += 1
                with self._counts.get_lock():
                    self._counts[0] += 1
            return sample

        empty_draws = 0
        for shard in self._shard_stream(rng, rank, world, worker, workers):
            got = 0
            for raw in self._raw_samples(shard):
                got += 1
                buffer.append(raw)
                if len(buffer) > self.shuffle:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    sample = emit(buffer.pop())
                    if sample is not None:
                        yield sample
                    if quota is not None and produced >= quota:
                        return
            empty_draws = 0 if got else empty_draws + 1
            if self.resample and empty_draws > 10 * len(self.shards):
                raise RuntimeError(
                    f"no readable sample in {empty_draws} shard draws from {self.shards[0].path}..."
                )
        rng.shuffle(buffer)
        while buffer and (quota is None or produced < quota):
            sample = emit(buffer.pop())
            if sample is not None:
                yield sample

    def __repr__(self) -> str:
        mode = "resampled" if self.resample else "one-pass"
        n = len(self.shards)
        return f"WebDatasetSource(shards={n}, samples={len(self)}, {mode}, shuffle={self.shuffle})"


@register_scheme("wds")
def _wds(spec: str, split: str, transform: Transform | None) -> WebDatasetSource:
    check_split(split)  # the shards are one split already; the spec names which
    path, _, query = spec.partition("?")
    options = _parse_options(query, spec)
    shards, class_names = resolve_shards(path)
    return WebDatasetSource(
        shards,
        class_names,
        transform,
        shuffle=options["shuffle"],
        resample=bool(options["resample"]),
        seed=options["seed"],
    )
