"""Reading shards (mimkit.data.wds): round trip, splitting, quotas, seeding, URLs, bad data."""

import functools
import json
import shutil
import socket
import tarfile
import threading
import warnings
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info

from mimkit.data import (
    BadSampleWarning,
    WebDatasetSource,
    build_source,
    build_transform,
    resolve_shards,
    write_shards,
)

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
    return list(DataLoader(dataset, batch_size=None, num_workers=workers))


def _copy_set(shard_dir, dest):
    """A copy of the shard set to damage."""
    shutil.copytree(shard_dir, dest)
    return dest


def _read_recording(spec: str):
    """All samples of a one-pass read, and the BadSampleWarning messages it raised."""
    ds = build_source(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(ds)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]
    return ds, samples, messages


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


def test_patterns_brace_ranges_lists_and_counts(shard_dir, tmp_path):
    spec = f"{shard_dir}/train-{{000000..000002}}.tar,{shard_dir}/train-00000{{5,7}}.tar"
    found = resolve_shards(spec)
    assert [s.url.rsplit("-", 1)[1] for s in found.shards] == [
        "000000.tar",
        "000001.tar",
        "000002.tar",
        "000005.tar",
        "000007.tar",
    ]
    assert [s.samples for s in found.shards] == [3] * 5 and "circle" in found.class_names
    assert found.members == ["cls", "png", "seg.png"]  # from the index beside the shards

    (tmp_path / "x.tar").write_bytes((shard_dir / "train-000004.tar").read_bytes())
    alone = resolve_shards(f"{tmp_path}/x.tar")  # no index: counted by reading the shard
    assert [s.samples for s in alone.shards] == [3] and alone.members == ["cls", "png", "seg.png"]
    assert len(list(build_source(f"wds:{tmp_path}/x.tar"))) == 3


def test_pipe_and_file_urls(shard_dir):
    ds = build_source(f"wds:pipe:cat {shard_dir}/train-00000{{0..1}}.tar?shuffle=0")
    assert [s.samples for s in ds.shards] == [3, 3] and len(list(ds)) == 6
    ds = build_source(f"wds:file://{shard_dir}/train-index.json?shuffle=0")
    assert ds.shards[0].url == f"file://{shard_dir}/train-000000.tar"
    assert len(list(ds)) == 24 and ds.bad_samples == 0


def test_bad_spec_errors(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown option 'shufle'.*shuffle"):
        build_source(f"wds:{shard_dir}/train-index.json?shufle=3")
    with pytest.raises(FileNotFoundError, match="nope-index.json"):
        build_source(f"wds:{tmp_path}/nope-index.json")
    with pytest.raises(FileNotFoundError, match="none of the 2 shards"):
        build_source(f"wds:{tmp_path}/gone-{{0..1}}.tar")


def _worker_and_batch(samples):
    info = get_worker_info()
    return (info.id if info else 0), default_collate(samples)


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_quota_is_whole_batches_per_worker(shard_dir, workers):
    ds = build_source(f"wds:{shard_dir}/train-index.json?shuffle=4")
    ds.configure(resample=True, samples=22, batch=4, seed=1)  # 5 whole batches; 2 samples left out
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=_worker_and_batch)
    batches = list(loader)
    assert [len(b["image"]) for _, b in batches] == [4] * 5
    per_worker = [sum(1 for w, _ in batches if w == k) for k in range(max(workers, 1))]
    assert per_worker == ([3, 2] if workers == 2 else [5])  # batches dealt round robin to the workers
    assert ds.good_samples == 20 and ds.bad_samples == 0  # counted over the worker processes


def test_fewer_batches_than_workers_leaves_a_worker_idle(shard_dir):
    ds = build_source(f"wds:{shard_dir}/train-index.json").configure(resample=True, samples=4, batch=4)
    assert [len(b["image"]) for b in DataLoader(ds, batch_size=4, num_workers=2)] == [4]


def test_stream_is_seeded_by_its_position(shard_dir):
    ds = build_source(f"wds:{shard_dir}/train-index.json?shuffle=4").configure(resample=True, seed=1)

    def stream(workers=0, **position):
        ds.configure(samples=12, batch=2, **position)
        return [_key(s) for s in _read(ds, workers)]

    assert stream(start=0) == stream(start=0)
    assert stream(start=0) != stream(start=5)  # a resumed stream goes on from its position
    assert stream(start=0, epoch=1) != stream(start=0, epoch=0)
    assert stream(2, start=3) == stream(2, start=3)  # each worker's stream is seeded too
    assert stream(2, start=3, rank=1, world_size=2) != stream(2, start=3, rank=0, world_size=2)


def test_augmentation_leaves_the_callers_generator_alone(shard_dir):
    ds = build_source(f"wds:{shard_dir}/train-index.json?shuffle=4", "train", build_transform("pretrain", 16))
    ds.configure(resample=True, samples=8, batch=4, seed=1)

    def read(caller_seed: int):
        torch.manual_seed(caller_seed)
        keys = [_key(s) for s in ds]  # in this process (a DataLoader draws its own seed)
        return keys, torch.rand(4)

    keys, after = read(0)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))  # as if nothing had been read
    assert read(1)[0] == keys  # the augmentations come from the sample's seed, not the caller's


@pytest.fixture
def http_server(shard_dir):
    """A loopback HTTP server of the shard folder, on a free port; stopped after the test."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(shard_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_shards_over_http(shard_dir, http_server, reference, tmp_path):
    local = sorted(_key(s) for s in build_source(f"wds:{shard_dir}/train-index.json"))
    ds = build_source(f"wds:{http_server}/train-index.json")  # the index fetched, its shards beside it
    assert ds.shards[0].url == f"{http_server}/train-000000.tar" and len(ds) == 24
    assert sorted(_key(s) for s in ds) == local == sorted(reference)
    assert ds.bad_samples == 0

    ds = build_source(f"wds:{http_server}/train-{{000000..000003}}.tar")  # counts from the index beside
    assert [s.samples for s in ds.shards] == [3] * 4 and len(list(ds)) == 12

    index = json.loads((shard_dir / "train-index.json").read_text())  # a local index of remote shards
    for s in index["shards"]:
        s["name"] = f"{http_server}/{s['name']}"
    (tmp_path / "remote-index.json").write_text(json.dumps(index))
    ds = build_source(f"wds:{tmp_path}/remote-index.json")
    assert len(_read(ds, workers=2)) == 24 and ds.bad_samples == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_urls_are_skipped_and_counted(shard_dir, http_server, tmp_path):
    index = json.loads((shard_dir / "train-index.json").read_text())
    for s in index["shards"]:
        s["name"] = str(shard_dir / s["name"])  # an absolute path, as it is
    index["shards"][1]["name"] = f"{http_server}/no-such-shard.tar"  # 404
    index["shards"][2]["name"] = f"http://127.0.0.1:{_free_port()}/train-000002.tar"  # nothing listens
    (tmp_path / "mixed-index.json").write_text(json.dumps(index))
    ds, samples, messages = _read_recording(f"wds:{tmp_path}/mixed-index.json?shuffle=0")
    assert len(samples) == ds.good_samples == 18 and ds.bad_samples == 6
    # curl's exit status says why: 22 for an HTTP error status, 7 for no connection
    assert any(
        "no-such-shard.tar cannot be read (curl exited with status 22); skipped 3" in m for m in messages
    )
    assert any("train-000002.tar cannot be read (curl exited with status 7)" in m for m in messages)


def _members(shard) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def _cut(shard, offset: int) -> None:
    shard.write_bytes(shard.read_bytes()[:offset])


# Where a disk or a transfer may cut the shard, as (member of the second sample, bytes into its
# header block or data); every cut leaves the first of the shard's three samples whole.
CUTS = {
    "inside the image data": ("png", "data", 100),
    "inside the mask data": ("seg.png", "data", 10),
    "inside the image's header": ("png", "header", 200),
    "between the label and the image": ("png", "header", 0),
    "between two samples": ("cls", "header", 0),
}


@pytest.mark.parametrize("where", CUTS)
def test_truncated_shard_yields_only_whole_samples(shard_dir, tmp_path, where):
    bad = _copy_set(shard_dir, tmp_path / "bad")
    shard = bad / "train-000002.tar"
    members = _members(shard)
    second_key = members[3].name.partition(".")[0]
    suffix, part, into = CUTS[where]
    member = next(m for m in members if m.name == f"{second_key}.{suffix}")
    _cut(shard, (member.offset_data if part == "data" else member.offset) + into)

    ds, samples, messages = _read_recording(f"wds:{bad}/train-index.json?shuffle=0")
    assert len(samples) == ds.good_samples == 22 and ds.bad_samples == 2
    assert all(s.keys() == {"image", "label", "mask"} for s in samples)  # no partial sample got through
    assert [m for m in messages if "train-000002.tar is damaged after 1 of 3 samples" in m], messages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        list(
            DataLoader(build_source(f"wds:{bad}/train-index.json"), batch_size=4)
        )  # collates: no key missing


def test_truncated_shard_of_an_index_without_members(shard_dir, tmp_path):
    bad = _copy_set(shard_dir, tmp_path / "bad")
    index = json.loads((bad / "train-index.json").read_text())
    del index["members"]  # as an older index: whole means an image, and a label where there are classes
    (bad / "train-index.json").write_text(json.dumps(index))
    shard = bad / "train-000002.tar"
    image = next(m for m in _members(shard)[3:] if m.name.endswith(".png") and "seg" not in m.name)
    _cut(shard, image.offset_data + 100)  # the second sample's label is read, its image cut short

    ds, samples, messages = _read_recording(f"wds:{bad}/train-index.json?shuffle=0")
    assert len(samples) == 22 and ds.bad_samples == 2 and all("label" in s for s in samples)
    assert len(messages) == 1 and "damaged after 1 of 3 samples" in messages[0]  # dropped, not decoded


def test_missing_shard_is_skipped_and_counted(shard_dir, tmp_path):
    bad = _copy_set(shard_dir, tmp_path / "bad")
    (bad / "train-000005.tar").unlink()
    ds, samples, messages = _read_recording(f"wds:{bad}/train-index.json?shuffle=0")
    assert len(samples) == 21 and (ds.good_samples, ds.bad_samples) == (21, 3)
    assert any("train-000005.tar is missing; skipped (3 samples)" in m for m in messages)


def test_corrupt_image_is_skipped_and_counted_over_workers(shard_dir, tmp_path):
    bad = _copy_set(shard_dir, tmp_path / "bad")
    shard = bad / "train-000001.tar"
    image = next(m for m in _members(shard)[3:] if m.name.endswith(".png") and "seg" not in m.name)
    data = bytearray(shard.read_bytes())
    data[image.offset_data : image.offset_data + image.size] = bytes(image.size)  # zeroed; the tar intact
    shard.write_bytes(bytes(data))

    ds, samples, messages = _read_recording(f"wds:{bad}/train-index.json?shuffle=0")
    key = image.name.partition(".")[0]
    assert any(f"train-000001.tar:{key} cannot be decoded" in m for m in messages)
    assert len(samples) == 23 and (ds.good_samples, ds.bad_samples) == (23, 1)

    ds2 = build_source(f"wds:{bad}/train-index.json?shuffle=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        assert len(_read(ds2, workers=2)) == 23
    assert (ds2.good_samples, ds2.bad_samples) == (23, 1)  # the counts are shared with the workers


def test_resampling_an_unreadable_set_stops(tmp_path, shard_dir):
    bad = _copy_set(shard_dir, tmp_path / "bad")
    for shard in bad.glob("*.tar"):
        shard.unlink()
    ds = build_source(f"wds:{bad}/train-index.json").configure(resample=True, samples=8, batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(RuntimeError, match="no readable sample in 81 shard draws"):
            list(ds)


def test_direct_construction_needs_shards():
    with pytest.raises(ValueError, match="at least one shard"):
        WebDatasetSource([])
