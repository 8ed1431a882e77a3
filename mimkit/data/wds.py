"""The ``wds:`` source: webdataset tar shards, local or at any URL, as a stream of sample dicts.

Spec forms (after ``wds:``)::

    wds:/data/in1k/train-index.json                    the index tools/make_shards.py writes
    wds:http://host:8000/in1k/train-index.json         an index at a URL, its shards beside it
    wds:/data/in1k/train-{000000..000127}.tar          brace ranges (and {a,b} lists)
    wds:/a/train-{0..3}.tar,/b/extra-{0..1}.tar        several comma-separated patterns
    wds:pipe:cat /data/train-{0..3}.tar                any URL webdataset opens: pipe:, file:, http(s):
    wds:...?shuffle=2000&resample=1&seed=0             options (defaults: shuffle=1000, resample=0, seed=0)

Sample counts, class names and the members of a whole sample come from the index. Its shard names
resolve against the index's own location, so an index fetched from a URL reads the shards beside
it, and a name may itself be a URL or absolute path (a local index of remote shards). For a
pattern, counts come from an index beside the shards (any ``*-index.json`` in a local shard's
folder; ``PREFIX-index.json`` beside an http(s) shard named ``PREFIX-NNNNNN.tar``), failing that
from reading each shard through once.

Reading is a webdataset pipeline, built afresh for each iteration: the shard list, split over ranks
and DataLoader workers; each shard's members grouped into samples by webdataset's tar reader, one
shard at a time, keeping whole samples only; a shuffle buffer of ``shuffle`` samples (0: off);
decoding; the transform; this worker's quota. Ranks come from :meth:`WebDatasetSource.configure`
or, without it, ``torch.distributed``. Each worker reads one stream, a function of
``(seed, epoch, rank, stream)`` alone. Two modes:

- **one pass** (``resample=0``): a :class:`~webdataset.SimpleShardList` shuffled from
  ``(seed, epoch)`` (the same order on every rank); rank ``r`` of ``w`` takes every ``w``-th shard,
  stream ``k`` of ``n`` every ``n``-th of those, so every sample is read exactly once per epoch
  over all ranks and workers;
- **resampled** (``resample=1``): each stream draws shards with replacement from a
  :class:`~webdataset.ResampledShards` seeded by ``(seed, epoch, rank, stream)``, forever, or until
  its worker has produced its share of ``configure(samples=...)``; the trainer uses this mode so
  every rank sees exactly ``steps_per_epoch x global_batch / world_size`` samples per epoch.

A resumed iteration (``configure(start=...)``: the samples this rank has already read this epoch)
continues each stream where the uninterrupted iteration would be. Batches are dealt to workers round
robin, so after ``c`` batches worker ``k`` continues stream ``(c + k) mod n`` at that stream's share
of the ``c`` batches. The stream fast-forwards without decoding: shards wholly before the position
are passed over by their index counts, unopened, and the samples before it in the next shard are
read but not decoded. The resumed samples are the uninterrupted ones, augmentations included
(with the same numbers of ranks and workers), with a shuffle buffer too: the buffer
(:mod:`mimkit.data.shuffle`) replays its draws on sample numbers to know which samples it held at
the position, the stream is read (undecoded, unopened where whole shards allow) from the oldest
of them, only those and the ones after the position pass, and the buffer goes on from the
rebuilt state. In one-pass mode the stream's length, which fixes when the buffer starts to drain,
comes from the index counts. The position counts samples as the index does, so bad data before it
(a shard short of its count, an image that does not decode) makes the resumed stream repeat as
many samples as it lost.

The shuffle buffer draws from a generator seeded by the stream alone, and each sample's
augmentation from a seed of the stream and the sample's place in it, so a stream is reproducible
from its position and a sample looks the same whether or not the run was resumed. A sample is
``{"image", "label", "mask"}`` as from every other source (see :mod:`mimkit.data.sample`).

Bad data never stops the stream: a missing or unreachable shard, a shard cut short (inside a
member, inside a header or between samples), a sample missing a member, and an image that fails
to decode are skipped, each with a :class:`~mimkit.data.bad.BadSampleWarning` naming the shard or
sample, and counted in :attr:`WebDatasetSource.counts` (shared by all workers). webdataset's tar
reader stops silently at some damage (a header cut short or with a bad checksum), so a shard's loss
is what its index count says is missing, not only what raised. The trainer logs the counts and
stops only past ``data.max_bad_fraction``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as F

from mimkit.data.bad import BadSampleWarning, SampleCounts
from mimkit.data.folder import load_image
from mimkit.data.sample import Transform, check_split, make_sample
from mimkit.data.shards import IMAGE_MEMBERS, INDEX_FORMAT, close_stream, shard_contents
from mimkit.data.shuffle import buffer_state, shuffled
from mimkit.data.sources import register_scheme

__all__ = ["BadSampleWarning", "Shard", "ShardSet", "WebDatasetSource", "resolve_shards"]

OPTIONS = {"shuffle": 1000, "resample": 0, "seed": 0}
INDEX_TIMEOUT_S = 60
# Resampling draws shards forever; this many draws in a row without one readable sample means
# the set cannot be read at all (unmounted, server down), which skipping cannot fix.
MAX_EMPTY_DRAWS_PER_SHARD = 10
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: "C:" is no scheme
_NUMBERED_SHARD = re.compile(r"^(.*)-\d+\.tar$")


@dataclass(frozen=True)
class Shard:
    """One tar shard: where webdataset opens it (a path or URL) and its sample count (None: unknown)."""

    url: str
    samples: int | None


@dataclass(frozen=True)
class ShardSet:
    """What a ``wds:`` spec names: the shards, the class names and the members of a whole sample.

    ``members`` empty means unknown (an older index, or none): a whole sample then needs an image,
    and a ``cls`` where there are class names.
    """

    shards: list[Shard]
    class_names: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)


def _is_url(location: str) -> bool:
    return bool(_SCHEME.match(location))


def _local_path(location: str) -> Path | None:
    """The file a location names on this machine (a path or a ``file:`` URL), None for other URLs."""
    if location.startswith("file:"):
        return Path(url2pathname(urlparse(location).path))
    if _is_url(location):
        return None
    return Path(location).expanduser().absolute()


def _read_text(location: str) -> str:
    """An index's text from a path or any URL: urllib for http(s), webdataset's opener for the rest."""
    path = _local_path(location)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"shard index {location} not found (tools/make_shards.py writes it)")
        return path.read_text()
    try:
        if location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location, timeout=INDEX_TIMEOUT_S) as response:
                return response.read().decode()
        with wds.gopen(location, "rb") as stream:
            return stream.read().decode()
    except OSError as err:
        raise FileNotFoundError(f"cannot fetch the shard index {location}: {err}") from err


def _read_index(location: str) -> dict[str, Any]:
    try:
        index = json.loads(_read_text(location))
    except ValueError as err:
        raise ValueError(f"cannot read the shard index {location}: {err}") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{location} is not a mimkit shard index (expected format {INDEX_FORMAT!r})")
    return index


def _shard_location(index_location: str, name: str) -> str:
    """Where an index's shard ``name`` is: a URL or absolute path as it is, else beside the index."""
    if _is_url(name):
        return name
    if os.path.isabs(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if not _is_url(index_location):
        return str(_local_path(index_location).parent / name)
    return urljoin(index_location, name)  # http(s) and file: URLs; a pipe: index names shards in full


def _index_set(location: str) -> ShardSet:
    index = _read_index(location)
    shards = [Shard(_shard_location(location, s["name"]), int(s["samples"])) for s in index["shards"]]
    return ShardSet(shards, list(index.get("class_names", [])), list(index.get("members", [])))


def _split_patterns(spec: str) -> list[str]:
    """Split at the commas between patterns, not at those of a ``{a,b}`` list inside one."""
    patterns, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            patterns.append(spec[start:i])
            start = i + 1
    patterns.append(spec[start:])
    return [p for p in patterns if p]


def _expand(spec: str) -> list[str]:
    """The shard locations of comma-separated brace patterns; local paths made absolute."""
    locations = [loc for pattern in _split_patterns(spec) for loc in braceexpand(pattern)]
    return [loc if _is_url(loc) else str(_local_path(loc)) for loc in locations]


def _indexes_beside(locations: list[str]) -> list[str]:
    """Index files that may count the shards at ``locations``."""
    found = []
    for folder in sorted({str(Path(loc).parent) for loc in locations if not _is_url(loc)}):
        found.extend(str(p) for p in sorted(Path(folder).glob("*-index.json")))
    for loc in locations:
        match = _NUMBERED_SHARD.match(loc)
        if loc.startswith(("http://", "https://")) and match and f"{match[1]}-index.json" not in found:
            found.append(f"{match[1]}-index.json")
    return found


def _count_by_reading(location: str) -> tuple[int | None, set[str]]:
    """A shard's sample count and common members by reading it through; (None, set()) if it cannot be read."""
    try:
        return shard_contents(location)
    except (OSError, tarfile.TarError, ValueError):  # reported, and counted, when the stream meets it
        return None, set()


def _pattern_set(spec: str) -> ShardSet:
    locations = _expand(spec)
    if not locations:
        raise ValueError(f"wds:{spec} names no shards")
    counts: dict[str, int] = {}
    class_names: list[str] = []
    members: list[str] = []
    for index_location in _indexes_beside(locations):
        try:
            known = _index_set(index_location)
        except (ValueError, FileNotFoundError):
            continue  # not a mimkit index, or none at that URL: the shards may still be counted
        counts.update((s.url, s.samples) for s in known.shards)
        class_names = class_names or known.class_names
        members = members or known.members
    shards, common = [], None
    for loc in locations:
        n = counts.get(loc)
        if n is None:
            n, found = _count_by_reading(loc)
            if n:
                common = found if common is None else common & found
        shards.append(Shard(loc, n))
    if all(s.samples is None for s in shards):
        raise FileNotFoundError(
            f"none of the {len(locations)} shards of wds:{spec} can be read (first: {locations[0]})"
        )
    return ShardSet(shards, class_names, members or sorted(common or ()))


def resolve_shards(spec: str) -> ShardSet:
    """The shards, class names and sample members named by a ``wds:`` spec (without its ``?options``)."""
    if not spec:
        raise ValueError(
            "wds: needs shards, e.g. wds:/data/train-{000000..000127}.tar or wds:/data/train-index.json"
        )
    if spec.endswith(".json"):
        return _index_set(spec)
    return _pattern_set(spec)


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
    """A 63-bit seed from several integers (stable across processes, unlike hash() of a tuple)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# The generators a worker's stream draws from, each seeded by the stream and its own tag.
_SHARDS, _BUFFER, _AUGMENT = 0, 1, 2
_POSITION = "__position__"  # a raw sample's place in its stream, for its augmentation seed


def _no_worker_seed() -> int:
    """ResampledShards' worker seed: the stream seed it is given already holds rank and worker."""
    return 0


def _every_nth(src: Iterable, offset: int, step: int) -> Iterator:
    return islice(src, offset, None, step)


every_nth = wds.pipelinefilter(_every_nth)


def _numbered(samples: Iterable[dict[str, Any]], first: int) -> Iterator[dict[str, Any]]:
    """Each raw sample tagged with its place in the stream, which the shuffle buffer then hides."""
    for position, sample in enumerate(samples, first):
        sample[_POSITION] = position
        yield sample


_PROCESS_EXIT = re.compile(r"^\(\(\[?'([^' ]+).*: exit (\d+) \(read\)")


def _describe(exn: BaseException) -> str:
    """An exception as one line, without the stream objects webdataset appends to its arguments."""
    text = str(exn.args[0]) if exn.args else ""
    if isinstance(exn, OSError) and exn.strerror:
        text = exn.strerror
    exited = _PROCESS_EXIT.match(text)  # webdataset's pipe: "(('curl', ...), {...}): exit 7 (read)"
    if exited:
        return f"{exited[1]} exited with status {exited[2]}"
    return f"{type(exn).__name__}: {text.split(' @ ')[0]}"


def _decode_mask(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return F.pil_to_tensor(img.convert("L"))[0]


class UndecodableSample(ValueError):
    """A whole sample whose image, label or mask does not decode; carries the sample's name."""

    def __init__(self, name: str, err: Exception):
        super().__init__(f"sample {name} cannot be decoded ({err}); skipped")


class WebDatasetSource(IterableDataset):
    """Iterable dataset over tar shards: samples ``{"image", "label", "mask"}`` (see module docs).

    Args:
        shards: the shards, with their sample counts.
        class_names: class names, from the index.
        transform: applied jointly to image and mask, under a per-sample seed.
        members: the members every whole sample has (from the index; empty: an image, and a
            ``cls`` where there are class names).
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
        members: list[str] | tuple[str, ...] = (),
        shuffle: int = OPTIONS["shuffle"],
        resample: bool = False,
        seed: int = 0,
    ):
        if not shards:
            raise ValueError("WebDatasetSource needs at least one shard")
        self.shards = list(shards)
        self.class_names = list(class_names)
        self.transform = transform
        self.members = tuple(members)
        self.shuffle = shuffle
        self.resample = bool(resample)
        self.seed = seed
        self.epoch, self.start = 0, 0
        self.rank: int | None = None
        self.world_size: int | None = None
        self.samples: int | None = None
        self.batch = 1
        self.counts = SampleCounts()
        self._by_url = {s.url: s for s in self.shards}

    def __len__(self) -> int:
        """Samples in one pass over all shards: the epoch length."""
        return sum(s.samples or 0 for s in self.shards)

    @property
    def good_samples(self) -> int:
        """Samples yielded so far, by all workers."""
        return self.counts.good

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far (undecodable, partial, in a truncated or missing shard), by all workers."""
        return self.counts.bad

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

        ``epoch`` seeds the stream; ``start`` is this rank's position in it, the samples it has
        already read this epoch (in whole batches), from which a resumed iteration continues;
        ``samples`` caps this rank's samples per iteration, split over workers in whole
        ``batch``-sized groups so that a DataLoader with ``batch_size=batch`` sees only full batches.
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
        """(rank, world size, worker, workers) of the iteration about to run."""
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
        """This worker's samples: its share of the rank's whole batches, dealt round robin."""
        if self.samples is None:
            return None
        batches = self.samples // self.batch
        return len(range(worker, batches, workers)) * self.batch

    def _resume_point(self, worker: int, workers: int) -> tuple[int, int]:
        """(stream, position in it) where this worker continues after ``start`` samples of the rank.

        The DataLoader deals batches round robin, so batch ``c``, the first one of a resumed
        iteration, is the next one of stream ``c mod n``; each stream has had its share of ``c``.
        """
        done = self.start // self.batch
        stream = (done + worker) % workers
        return stream, len(range(stream, done, workers)) * self.batch

    def _shard_list(self, rank: int, world: int, stream: int, streams: int) -> list:
        """The pipeline's first stages: which shards a stream reads, in which order."""
        urls = [s.url for s in self.shards]
        if self.resample:
            seed = _mix(self.seed, self.epoch, rank, stream, _SHARDS)
            return [wds.ResampledShards(urls, seed=seed, worker_seed=_no_worker_seed, deterministic=True)]
        # one order for every rank, from (seed, epoch) alone, so the ranks' slices partition it
        order_seed = _mix(self.seed, self.epoch) if self.shuffle else None
        shard_list = wds.SimpleShardList(urls, seed=order_seed)
        return [shard_list, every_nth(rank, world), every_nth(stream, streams)]

    def _stream_length(self, shard_list: list) -> int | None:
        """Samples in a one-pass stream's shards, by the index's counts (None: a count is unknown)."""
        counts = [self._by_url[source["url"]].samples for source in wds.DataPipeline(*shard_list)]
        return None if None in counts else sum(counts)

    def _is_whole(self, sample: dict[str, Any]) -> bool:
        """Whether a sample has every member: a cut shard leaves part of one, which collate fails on."""
        if self.members:
            return all(m in sample for m in self.members)
        has_image = any(k in sample for k in IMAGE_MEMBERS)
        return has_image and ("cls" in sample or not self.class_names)

    def _whole_samples(self, sources: Iterable[dict[str, Any]], skip: int = 0) -> Iterator[dict[str, Any]]:
        """The whole samples of each shard in turn, past the first ``skip``; a resampled set with
        nothing readable raises.

        A shard the index counts within ``skip`` is passed over unopened: fast-forwarding a
        resumed stream then costs nothing per skipped shard. An empty or uncounted one is read,
        so that an unreadable set still stops.
        """
        empty_draws = 0
        for source in sources:
            shard = self._by_url.get(source["url"], Shard(source["url"], None))
            if shard.samples and shard.samples <= skip:
                skip -= shard.samples
                continue
            whole = yield from self._read_shard(shard, skip)
            skip = max(skip - whole, 0)
            empty_draws = 0 if whole else empty_draws + 1
            if self.resample and empty_draws > MAX_EMPTY_DRAWS_PER_SHARD * len(self.shards):
                raise RuntimeError(
                    f"no readable sample in {empty_draws} shard draws from {self.shards[0].url}...; "
                    "see the BadSampleWarning lines above"
                )

    def _read_shard(self, shard: Shard, skip: int = 0) -> Iterator[dict[str, Any]]:
        """One shard through webdataset's tar reader (one shard at a time, so no sample spans two).

        The reader's handler notes the first error and lets it read on; a sample the damage left
        without some member is dropped here, and so are the first ``skip`` whole ones, before
        anything decodes them. The loss is counted once the shard is done (not when a quota ends
        the reading mid-shard). Returns the number of whole samples, skipped ones included.
        """
        errors: list[Exception] = []

        def note_and_continue(exn: Exception) -> bool:
            errors.append(exn)
            return True

        source = {"url": shard.url}
        whole = partial = 0
        try:
            for sample in wds.tarfile_samples([source], handler=note_and_continue):
                if not self._is_whole(sample):
                    partial += 1
                    continue
                whole += 1
                if whole > skip:
                    yield sample
        except BaseException:  # stopped early (a quota reached): the reader's exit status means nothing
            close_stream(source)
            raise
        # a download's process exiting with an error is the cause of what the tar reader then met
        error = close_stream(source) or (errors[0] if errors else None)
        self._count_shard_loss(shard, whole, partial, error)
        return whole

    def _count_shard_loss(self, shard: Shard, whole: int, partial: int, error: Exception | None) -> None:
        """Count and report what a shard read through did not deliver.

        Against the index's count where there is one: the tar reader ends quietly at a header cut
        short or with a bad checksum, so an error alone would miss those losses.
        """
        expected = shard.samples
        if expected is not None:
            lost = max(expected - whole, partial)
        else:
            lost = max(partial, int(error is not None))
        if not lost and error is None:
            return
        if error is not None:
            reason = _describe(error)
        elif partial:
            reason = "it ends inside a sample"
        else:
            reason = "it ends early"
        of = f" of {expected}" if expected is not None else ""
        if whole == 0 and isinstance(error, FileNotFoundError):
            message = f"shard {shard.url} is missing; skipped ({lost} samples)"
        elif whole == 0 and error is not None:
            message = f"shard {shard.url} cannot be read ({reason}); skipped {lost} samples"
        else:
            message = f"shard {shard.url} is damaged after {whole}{of} samples ({reason}); skipped {lost}"
        self.counts.skipped(lost, message)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A whole sample's bytes as a uint8 image, an int label and a mask (where present)."""
        name = f"{raw['__url__'].rsplit('/', 1)[-1]}:{raw['__key__']}"
        image_key = next((k for k in IMAGE_MEMBERS if k in raw), None)
        try:
            if image_key is None:
                raise ValueError(f"no image among the members {sorted(raw)}")
            image = load_image(raw[image_key], name)  # the modes converted as folder: converts them
            label = int(raw["cls"].decode()) if "cls" in raw else None
            mask = _decode_mask(raw["seg.png"]) if "seg.png" in raw else None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
            raise UndecodableSample(name, err) from err
        return {"image": image, "label": label, "mask": mask, "position": raw[_POSITION]}

    def _skip_undecodable(self, exn: Exception) -> bool:
        """webdataset's handler for the decoding stage: count, warn and go on; anything else is a bug."""
        if isinstance(exn, UndecodableSample):
            self.counts.skipped(1, str(exn))
            return True
        raise exn

    def _transformed(self, decoded: Iterable[dict[str, Any]], stream_seed: int) -> Iterator[dict]:
        """Each decoded sample under a seed of its place in the stream, counted as delivered.

        The caller's stream (e.g. the masks') is left alone: the CPU generator's state is saved
        and restored around each sample, as ``torch.random.fork_rng(devices=[])`` does, without
        its per-call overhead. Only the CPU generator is seeded: ``torch.manual_seed`` also
        queues lazy CUDA/XPU seeding.
        """
        generator = torch.default_generator
        for d in decoded:
            parts = {"label": d["label"], "mask": d["mask"]}
            if self.transform is None:
                sample = make_sample(d["image"], **parts)
            else:
                caller_state = generator.get_state()
                try:
                    generator.manual_seed(_mix(stream_seed, d["position"]))
                    sample = make_sample(d["image"], **parts, transform=self.transform)
                finally:
                    generator.set_state(caller_state)
            self.counts.delivered()
            yield sample

    def pipeline(self) -> wds.DataPipeline:
        """The webdataset pipeline of one iteration at the configured position, in this process."""
        rank, world, worker, workers = self._place()
        stream, position = self._resume_point(worker, workers)
        key = (self.seed, self.epoch, rank, stream)
        shard_list = self._shard_list(rank, world, stream, workers)
        if not self.shuffle:
            stages = [
                *shard_list,
                functools.partial(self._whole_samples, skip=position),
                functools.partial(_numbered, first=position),
            ]
        else:
            # the buffer as the uninterrupted stream would hold it here, its samples read again
            length = None if self.resample else self._stream_length(shard_list)
            state = buffer_state(position, self.shuffle, _mix(*key, _BUFFER), length)
            stages = [
                *shard_list,
                functools.partial(self._whole_samples, skip=state.oldest),
                functools.partial(_numbered, first=state.oldest),
                wds.select(lambda sample: state.wants(sample[_POSITION])),
                functools.partial(shuffled, size=self.shuffle, state=state, position=itemgetter(_POSITION)),
            ]
        stages += [
            wds.map(self._decode, handler=self._skip_undecodable),
            functools.partial(self._transformed, stream_seed=_mix(*key, _AUGMENT)),
        ]
        quota = self._quota(worker, workers)
        if quota is not None:
            stages.append(wds.slice(quota))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        _, _, worker, workers = self._place()
        if self._quota(worker, workers) == 0:  # fewer batches than workers: this worker has none
            return iter(())
        return iter(self.pipeline())

    def __repr__(self) -> str:
        mode = "resampled" if self.resample else "one-pass"
        n = len(self.shards)
        return f"WebDatasetSource(shards={n}, samples={len(self)}, {mode}, shuffle={self.shuffle})"


@register_scheme("wds")
def _wds(spec: str, split: str, transform: Transform | None) -> WebDatasetSource:
    check_split(split)  # the shards are one split already; the spec names which
    path, _, query = spec.partition("?")
    options = _parse_options(query, spec)
    shard_set = resolve_shards(path)
    return WebDatasetSource(
        shard_set.shards,
        shard_set.class_names,
        transform,
        members=shard_set.members,
        shuffle=options["shuffle"],
        resample=bool(options["resample"]),
        seed=options["seed"],
    )
