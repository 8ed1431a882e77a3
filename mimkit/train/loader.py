"""The training data order: a per-epoch permutation, sharded over ranks, resumable mid-epoch.

Epoch ``e`` visits ``randperm(len(dataset))`` drawn from ``seed + e``, cut to whole global
batches. Rank ``r`` of ``w`` takes every ``w``-th index starting at ``r`` (DistributedSampler's
split), so optimizer step ``s`` consumes exactly permutation entries ``[s*G, (s+1)*G)`` across
ranks. Resuming at step ``s`` of an epoch skips those entries without loading them.

Each sample's augmentation draws from its own generator seeded by ``(seed, epoch, index)``, so
a sample looks the same whatever the number of workers and whether the epoch was resumed.

Both the sampler and the stream schedule report ``counts()``: samples read and samples skipped as
bad on this rank, for sources that keep them (a map-style source through a
:class:`~mimkit.data.bad.SampleCounts` attribute ``counts``), so the trainer logs and judges bad
data the same way whatever the source.

An iterable source (``wds:`` shards) has no indices to permute: :func:`build_stream_loader` reads a
resampled stream instead, exactly as many samples per rank and epoch, seeded per epoch, rank and
worker; resuming at step ``s`` fast-forwards it to the samples step ``s`` would have read (see
:class:`StreamSchedule`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from mimkit.data.bad import SampleCounts


class ResumableShardSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs of one rank's share of an epoch.

    Args:
        length: dataset length.
        global_batch: images per optimizer step over all ranks; a last partial batch is dropped.
        rank, world_size: this rank's place.
        seed: the run seed.
        sample_counts: the dataset's counts of samples read and skipped, where it keeps them.
    """

    def __init__(
        self,
        length: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        sample_counts: SampleCounts | None = None,
    ):
        self.length, self.global_batch = length, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sample_counts = sample_counts
        self.steps_per_epoch = length // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Visit epoch ``epoch`` from optimizer step ``start_step`` of it."""
        self.epoch, self.start_step = epoch, start_step

    def _per_rank(self) -> int:
        return self.steps_per_epoch * self.global_batch // self.world_size

    def __len__(self) -> int:
        return self._per_rank() - self.start_step * self.global_batch // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g)[: self.steps_per_epoch * self.global_batch]
        share = order[self.rank :: self.world_size]
        skip = self.start_step * self.global_batch // self.world_size
        for index in share[skip:].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)

    def counts(self) -> tuple[int, int] | None:
        """(samples read, samples skipped as bad) on this rank, or None for a source that keeps no counts."""
        if self.sample_counts is None:
            return None
        return self.sample_counts.good, self.sample_counts.bad


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (1 << 63)


class SeededSamples(Dataset):
    """Wraps a map-style dataset so ``dataset[(index, seed)]`` runs the transform under ``seed``.

    Only torch's CPU generator is forked and reseeded, so the caller's random state (the mask
    draws and, on GPUs, the CUDA generators behind drop path) is untouched. ``torch.manual_seed``
    would also reseed every CUDA device on each sample: slower, and with workers=0 it would tie the
    model's CUDA randomness to the last sample loaded.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def build_loader(
    dataset: Dataset,
    micro_batch: int,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    pin_memory: bool,
) -> tuple[DataLoader, ResumableShardSampler]:
    """The training loader and its sampler (call ``sampler.set_epoch`` before each epoch)."""
    counts = getattr(dataset, "counts", None)
    sample_counts = counts if isinstance(counts, SampleCounts) else None
    sampler = ResumableShardSampler(len(dataset), global_batch, rank, world_size, seed, sample_counts)
    loader = DataLoader(
        SeededSamples(dataset),
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,  # the sampler already yields whole batches
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Starting an epoch draws the workers' base seed; from its own generator it leaves the
        # global stream (the masks) alone, so a resumed run draws the same masks.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


class StreamSchedule:
    """The epoch bookkeeping of an iterable source (``wds:``), in place of a sampler.

    Each epoch every rank reads exactly ``steps_per_epoch * global_batch / world_size`` samples
    from a resampled stream seeded by ``(seed, epoch, rank, worker)``. A run resumed mid-epoch
    continues that stream past the samples its steps already read, skipping them undecoded; only
    the source's shuffle buffer makes the position inexact (see :mod:`mimkit.data.wds`).
    """

    def __init__(self, dataset, length: int, global_batch: int, micro_batch: int, rank: int, world_size: int):
        self.dataset, self.global_batch = dataset, global_batch
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.steps_per_epoch = length // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Visit epoch ``epoch`` from optimizer step ``start_step`` of it."""
        self.epoch, self.start_step = epoch, start_step
        per_step = self.global_batch // self.world_size
        self.dataset.configure(
            epoch=epoch,
            start=start_step * per_step,
            rank=self.rank,
            world_size=self.world_size,
            resample=True,
            samples=(self.steps_per_epoch - start_step) * per_step,
            batch=self.micro_batch,
        )

    def counts(self) -> tuple[int, int]:
        """(samples read, samples skipped as bad) on this rank since the loader was built."""
        return self.dataset.good_samples, self.dataset.bad_samples


def build_stream_loader(
    dataset: IterableDataset,
    micro_batch: int,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    pin_memory: bool,
) -> tuple[DataLoader, StreamSchedule]:
    """The training loader over an iterable source and its schedule (``set_epoch`` before each epoch)."""
    dataset.configure(seed=seed)
    schedule = StreamSchedule(dataset, len(dataset), global_batch, micro_batch, rank, world_size)
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        num_workers=workers,
        pin_memory=pin_memory,
        # workers restart each epoch so they see the position set_epoch configured
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, schedule
