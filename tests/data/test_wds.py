"""Reading shards (mimkit.data.wds): round trip, rank and worker splitting, resampling, bad data."""

import io
import tarfile
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from mimkit.data import BadSampleWarning, WebDatasetSource, build_source, resolve_shards, write_shards

SOURCE = "synthetic:shapes?size=32&train=24&val=4"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(SOURCE, out, shard_size=3, progress=False)  # 8 shards of 3
    return out


def _key(sample) -> bytes:
    return (sample["image"] * 255).round().to(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def reference():
    """The source's samples by image bytes."""
    ref = build_source(SOURCE)
    return {_key(s): s for s in (ref[i] for i in range(len(ref)))}


def _read(dataset, workers: int) -> list[dict]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return list(loader)


def test_round_trip_each_sample_once_over_2_ranks_x_2_workers(shard_dir, reference):
    seen = []
    for rank in range(2):
        ds = build_source(f"wds:{shard_dir}/train-index.json?shuffle=5&seed=3")
        ds.configure(rank=rank, world_size=2, epoch=1)
        seen.append(_read(ds, workers=2))
    assert len(seen[0]) == len(seen[1]) == 12
    keys = [_key(s) for part in seen for s in part]
    assert sorted(keys) == sorted(reference)  # every sample exactly once, PNG pixels unchanged
    for sample in seen[0] + seen[1]:
        ref = reference[_key(sample)]
        assert sample.keys() == ref.keys() == {"image", "label", "mask"}
        assert torch.equal(sample["image"], ref["image"])
        assert torch.equal(sample["label"], ref["label"]) and torch.equal(sample["mask"], ref["mask"])


def test_shuffle_changes_with_epoch_and_seed(shard_dir):
    def order(epoch, seed):
        ds = build_source(f"wds:{shard_dir}/train-index.json?shuffle=6&seed={seed}")
        return [_key(s) for s in ds.configure(epoch=epoch)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    assert sorted(order(0, 0)) == sorted(order(1, 0))


def test_patterns_brace_ranges_and_counts(shard_dir):
    shards, classes = resolve_shards(f"{shard_dir}/train-{{000000..000002}}.tar,{shard_dir}/train-000007.tar")
    assert [s.path.rsplit("-", 1)[1] for s in shards] == [
        "000000.tar",
        "000001.tar",
        "000002.tar",
        "000007.tar",
    ]
    assert [s.samples for s in shards] == [3, 3, 3, 3] and "circle" in classes
    (shard_dir / "alone").mkdir(exist_ok=True)
    (shard_dir / "alone" / "x.tar").write_bytes((shard_dir / "train-000004.tar").read_bytes())
    assert len(build_source(f"wds:{shard_dir}/alone/x.tar")) == 3  # no index: counted from the headers


def test_bad_spec_errors(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown option 'shufle'.*shuffle"):
        build_source(f"wds:{shard_dir}/train-index.json?shufle=3")
    with pytest.raises(FileNotFoundError, match="nope-index.json"):
        build_source(f"wds:{tmp_path}/nope-index.json")


def test_resampled_stream_quota_in_whole_batches_and_seeded_start(shard_dir):
    ds = build_source(f"wds:{shard_dir}/train-index.json?shuffle=4")
    ds.configure(resample=True, samples=20, batch=4, seed=1)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [len(b["image"]) for b in batches] == [4] * 5  # 20 samples: 3 batches + 2 batches

    def stream(start):
        return [_key(s) for s in ds.configure(start=start, samples=12, batch=1)]

    assert stream(0) == stream(0)
    assert stream(0) != stream(5)  # a resumed position is a new stream, not the epoch's start again


def _corrupt(shard, member_index: int) -> None:
    """Rewrite ``shard`` with the bytes of member ``member_index`` replaced by garbage."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            data = b"garbage, not a png" if i == member_index else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_corrupt_image_truncated_and_missing_shard_are_skipped_and_counted(shard_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(8):
        (bad / f"train-{i:06d}.tar").write_bytes((shard_dir / f"train-{i:06d}.tar").read_bytes())
    (bad / "train-index.json").write_bytes((shard_dir / "train-index.json").read_bytes())
    _corrupt(bad / "train-000001.tar", 3)  # the image of the shard's second sample
    truncated = bad / "train-000002.tar"
    with tarfile.open(truncated) as tar:
        cut = tar.getmembers()[3].offset_data + 10  # inside the second sample's image
    truncated.write_bytes(truncated.read_bytes()[:cut])  # the first sample survives
    (bad / "train-000005.tar").unlink()

    ds = build_source(f"wds:{bad}/train-index.json?shuffle=0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(ds)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]
    assert any("train-000001.tar:000000004 cannot be decoded" in m for m in messages)
    assert any("train-000002.tar is damaged" in m for m in messages)
    assert any("train-000005.tar is missing" in m for m in messages)
    # 24 - 1 corrupt - 2 lost to the truncation - 3 in the missing shard
    assert len(samples) == ds.good_samples == 18
    assert ds.bad_samples == 6

    # the counts are shared with DataLoader worker processes
    ds2 = build_source(f"wds:{bad}/train-index.json?shuffle=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(_read(ds2, workers=2)) == 18
    assert (ds2.good_samples, ds2.bad_samples) == (18, 6)


def test_direct_construction_needs_shards():
    with pytest.raises(ValueError, match="at least one shard"):
        WebDatasetSource([])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    from mimkit.data.wds import tar_members

    names = ["a/000.png", "b" * 120 + "/001.cls", "sub/" + "é" * 3 + ".seg.png"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:1] + ["c" * 60 + "/" + "d" * 60 + ".cls"]  # ustar splits long names via prefix
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes(range(256)) * 2 + bytes([i]) * (100 + i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(tarfile.TarInfo("somedir/"))  # not a regular file: skipped
    with open(path, "rb") as f:
        ours = list(tar_members(f))
    with tarfile.open(path) as tar:
        theirs = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert ours == theirs
