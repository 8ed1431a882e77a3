"""Resuming a ``wds:`` stream by position: the uninterrupted stream's tail, fast-forwarded undecoded."""

import pytest
import torch

import mimkit.data.wds as wds_source
from mimkit.data import WebDatasetSource, build_source, write_shards
from mimkit.train.loader import build_stream_loader

SHARD_SIZE = 4
SAMPLES = 48  # 12 shards of 4


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    source = f"synthetic:shapes?size=16&train={SAMPLES}&val=4"
    write_shards(source, out, shard_size=SHARD_SIZE, progress=False)
    return f"{out}/train-index.json"


def _key(sample) -> bytes:
    """A sample's identity: its pixels and label, unchanged through lossless PNG shards."""
    pixels = (sample["image"] * 255).round().to(torch.uint8).numpy().tobytes()
    return pixels + bytes([int(sample["label"])])


def _resampled(index: str, shuffle: int, *, start: int, samples: int, transform=None) -> WebDatasetSource:
    ds = build_source(f"wds:{index}?shuffle={shuffle}&seed=7", transform=transform)
    return ds.configure(resample=True, epoch=1, start=start, samples=samples)


def test_the_shards_tell_samples_apart(index):
    keys = [_key(s) for s in build_source(f"wds:{index}?shuffle=0")]
    assert len(keys) == len(set(keys)) == SAMPLES


@pytest.mark.parametrize("start", [1, 4, 10, 23])  # at and between shard boundaries
def test_resumed_stream_without_shuffle_is_the_uninterrupted_tail(index, start):
    total = 30
    whole = [_key(s) for s in _resampled(index, 0, start=0, samples=total)]
    resumed = [_key(s) for s in _resampled(index, 0, start=start, samples=total - start)]
    assert resumed == whole[start:]


def _noisy(sample: dict) -> dict:
    """An augmentation drawn from torch's generator, as the training transforms are."""
    return {**sample, "image": sample["image"].float() / 255 + torch.rand(1)}


def test_resumed_samples_get_the_uninterrupted_augmentations(index):
    whole = list(_resampled(index, 0, start=0, samples=20, transform=_noisy))
    resumed = list(_resampled(index, 0, start=9, samples=11, transform=_noisy))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(whole[9:], resumed, strict=True))


@pytest.mark.parametrize("start", [5, 17, 30, 44])  # 44: while the buffer drains at the end
def test_one_pass_resumed_with_shuffle_is_the_uninterrupted_tail(index, start):
    shuffle = 6
    ds = build_source(f"wds:{index}?shuffle={shuffle}&seed=2").configure(epoch=3)
    whole = [_key(s) for s in ds.configure(start=0)]
    resumed = [_key(s) for s in ds.configure(start=start)]
    assert len(whole) == SAMPLES and sorted(whole) == sorted(_key(s) for s in build_source(f"wds:{index}"))
    assert resumed == whole[start:]


@pytest.mark.parametrize("start", [6, 19])
def test_resampled_resumed_with_shuffle_is_the_uninterrupted_tail(index, start):
    shuffle, total = 6, 40
    whole = [_key(s) for s in _resampled(index, shuffle, start=0, samples=total)]
    resumed = [_key(s) for s in _resampled(index, shuffle, start=start, samples=total - start)]
    assert whole[:start] != [_key(s) for s in _resampled(index, 0, start=0, samples=start)]  # shuffled
    assert resumed == whole[start:]


def test_resumed_with_shuffle_gets_the_uninterrupted_augmentations(index):
    whole = list(_resampled(index, 4, start=0, samples=20, transform=_noisy))
    resumed = list(_resampled(index, 4, start=9, samples=11, transform=_noisy))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(whole[9:], resumed, strict=True))


def _trainer_batches(index: str, workers: int, rank: int, world: int, start_step: int, shuffle: int) -> list:
    """The micro-batches of epoch 1 that the trainer's loader gives one rank, from ``start_step``."""
    ds = build_source(f"wds:{index}?shuffle={shuffle}")
    loader, schedule = build_stream_loader(ds, 2, 6 * world, rank, world, 5, workers, pin_memory=False)
    schedule.set_epoch(1, start_step)
    return [[_key({"image": i, "label": y}) for i, y in zip(b["image"], b["label"])] for b in loader]


@pytest.mark.parametrize("shuffle", [0, 5])
@pytest.mark.parametrize(("workers", "rank", "world"), [(0, 0, 1), (2, 0, 1), (2, 1, 2)])
def test_trainer_stream_resumes_exactly_over_workers(index, workers, rank, world, shuffle):
    whole = _trainer_batches(index, workers, rank, world, 0, shuffle)
    assert len(whole) == SAMPLES // (6 * world) * 3  # 3 micro-batches a step
    resumed = _trainer_batches(index, workers, rank, world, 1, shuffle)
    # 3 batches done, an odd number: of 2 workers, worker 0 continues the stream worker 1 was reading
    assert resumed == whole[3:]


def test_fast_forward_opens_no_skipped_shard_and_decodes_no_skipped_sample(index, monkeypatch):
    decoded, opened = [], []
    decode, read_shard = wds_source.load_image, WebDatasetSource._read_shard

    def counting_decode(data, name=None):
        decoded.append(1)
        return decode(data, name)

    def recording_read(self, shard, *skip):
        opened.append(shard.url)
        return read_shard(self, shard, *skip)

    monkeypatch.setattr(wds_source, "load_image", counting_decode)
    monkeypatch.setattr(WebDatasetSource, "_read_shard", recording_read)
    total, start = 30, 2 * SHARD_SIZE + 2

    assert len(list(_resampled(index, 0, start=0, samples=total))) == total
    whole_opened = list(opened)
    assert len(decoded) == total
    decoded.clear()
    opened.clear()

    assert len(list(_resampled(index, 0, start=start, samples=total - start))) == total - start
    assert opened == whole_opened[2:]  # two whole shards passed over, the third read from its 3rd sample
    assert len(decoded) == total - start  # only what the stream yields is decoded

    decoded.clear()
    ds = _resampled(index, 5, start=start, samples=total - start)
    assert len(list(ds)) == total - start and len(decoded) == total - start  # decoding is past the buffer
