"""Writing shards (mimkit.data.shards, tools/make_shards.py): index, atomic files, resume."""

import json
import tarfile

import pytest
import torch

from mimkit.data import build_source, write_shards
from mimkit.data import shards as shards_module

SOURCE = "synthetic:shapes?size=32&train=23&val=4"


def _tar_names(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar]


def test_index_and_layout(tmp_path):
    index = write_shards(SOURCE, tmp_path, shard_size=5, progress=False)
    names = [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["name"] for s in index["shards"]] == names
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["samples"] == 23
    assert index["class_names"] == list(build_source(SOURCE).class_names)
    assert json.loads((tmp_path / "train-index.json").read_text()) == index
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "train-index.json"])  # no leftovers
    assert _tar_names(tmp_path / names[-1]) == [
        f"{k:09d}.{ext}" for k in (20, 21, 22) for ext in ("png", "cls", "seg.png")
    ]


def test_val_split_and_prefix(tmp_path):
    index = write_shards(SOURCE, tmp_path, shard_size=3, split="val", prefix="v", progress=False)
    assert [s["name"] for s in index["shards"]] == ["v-000000.tar", "v-000001.tar"]
    assert (tmp_path / "v-index.json").is_file()


def test_interrupted_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    write_shards(SOURCE, straight, shard_size=4, progress=False)

    resumed = tmp_path / "resumed"
    real_encode = shards_module.encode_image
    calls = {"n": 0}

    def dying_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # in the middle of the third shard
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shards_module, "encode_image", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        write_shards(SOURCE, resumed, shard_size=4, progress=False)
    monkeypatch.setattr(shards_module, "encode_image", real_encode)
    left = sorted(p.name for p in resumed.iterdir())
    # two complete shards; the third never under its final name (its temporary file is removed
    # when the write fails; a killed process leaves it under the temporary name); no index yet
    assert [n for n in left if n.endswith(".tar") and not n.startswith(".")] == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert "train-index.json" not in left
    first_shard = (resumed / "train-000000.tar").stat().st_mtime_ns

    write_shards(SOURCE, resumed, shard_size=4, progress=False)
    assert (resumed / "train-000000.tar").stat().st_mtime_ns == first_shard  # kept, not rewritten
    final = sorted(p.name for p in resumed.iterdir())  # temporary and progress files are gone
    assert final == sorted(p.name for p in straight.iterdir())
    for name in final:
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name


def test_resume_with_other_options_is_an_error(tmp_path):
    write_shards(SOURCE, tmp_path, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(SOURCE, tmp_path, shard_size=5, progress=False)


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="shard_size=0"):
        write_shards(SOURCE, tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="'gif'.*png, jpg"):
        write_shards(SOURCE, tmp_path, image_format="gif")


def test_max_side_and_jpeg(tmp_path):
    write_shards(SOURCE, tmp_path, shard_size=30, image_format="jpg", max_side=20, progress=False)
    sample = next(iter(build_source(f"wds:{tmp_path}/train-index.json?shuffle=0")))
    assert sample["image"].shape == (3, 20, 20) and sample["mask"].shape == (20, 20)
    assert _tar_names(tmp_path / "train-000000.tar")[0].endswith(".jpg")


def test_unreadable_source_image_is_skipped(tmp_path):
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped"):
        index = write_shards(f"folder:{tmp_path / 'imgs'}", tmp_path / "out", shard_size=10, progress=False)
    assert index["samples"] == 3 and index["class_names"] == ["cat"]
    images = [s["image"] for s in build_source(f"wds:{tmp_path}/out/train-index.json?shuffle=0")]
    assert [int(round(float(im[0, 0, 0]) * 255)) for im in images] == [0, 40, 80]
    assert all(im.dtype == torch.float32 for im in images)


def test_folder_images_in_the_target_format_are_copied_byte_for_byte(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (12, 9), (200, 10, 10) if cls == "a" else (0, 0, 250)).save(
            tmp_path / "imgs" / cls / "x.jpg", quality=70
        )
    write_shards(f"folder:{tmp_path / 'imgs'}", tmp_path / "out", image_format="jpg", progress=False)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert members["000000000.jpg"] == (tmp_path / "imgs" / "a" / "x.jpg").read_bytes()
    assert members["000000001.jpg"] == (tmp_path / "imgs" / "b" / "x.jpg").read_bytes()
    assert (members["000000000.cls"], members["000000001.cls"]) == (b"0", b"1")
