"""Writing shards (mimkit.data.shards, tools/make_shards.py): index, order, atomic files, resume."""

import json
import tarfile

import pytest
import torch

from benchmarks.data import expected_distinct_labels, mean_distinct_labels, write_class_ordered_folder
from mimkit.cli.make_shards import main as make_shards
from mimkit.data import build_source, write_shards
from mimkit.data import shards as shards_module
from mimkit.data.shards import write_order

SOURCE = "synthetic:shapes?size=32&train=23&val=4"


def _tar_names(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar]


def _keys(path) -> list[int]:
    """The source indices a shard holds, in order."""
    return [int(name.partition(".")[0]) for name in _tar_names(path) if name.endswith(".cls")]


def test_index_and_layout(tmp_path):
    index = write_shards(SOURCE, tmp_path, shard_size=5, progress=False)
    names = [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["name"] for s in index["shards"]] == names
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["samples"] == 23
    assert index["class_names"] == list(build_source(SOURCE).class_names)
    assert index["members"] == ["cls", "png", "seg.png"]
    assert (index["options"]["order"], index["options"]["seed"]) == ("shuffled", 0)
    assert json.loads((tmp_path / "train-index.json").read_text()) == index
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "train-index.json"])  # no leftovers
    last = write_order(23, seed=0)[20:]
    assert _tar_names(tmp_path / names[-1]) == [
        f"{k:09d}.{ext}" for k in last for ext in ("cls", "png", "seg.png")
    ]
    with tarfile.open(tmp_path / names[0]) as tar:  # no time stamps or owners: bytes from content alone
        assert {(m.mtime, m.uname, m.gname) for m in tar} == {(0, "", "")}


def test_samples_are_written_shuffled_by_seed_or_in_order(tmp_path):
    def order(**kwargs):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        index = write_shards(SOURCE, out, shard_size=5, progress=False, **kwargs)
        return [k for s in index["shards"] for k in _keys(out / s["name"])], index["options"]

    shuffled, options = order()
    assert sorted(shuffled) == list(range(23)) and shuffled != list(range(23))  # each sample once
    assert order(seed=0)[0] == shuffled and order(seed=1)[0] != shuffled
    kept, options = order(keep_order=True)
    assert kept == list(range(23)) and (options["order"], options["seed"]) == ("source", None)


def test_val_split_and_prefix(tmp_path):
    index = write_shards(SOURCE, tmp_path, shard_size=3, split="val", prefix="v", progress=False)
    assert [s["name"] for s in index["shards"]] == ["v-000000.tar", "v-000001.tar"]
    assert (tmp_path / "v-index.json").is_file()


@pytest.mark.parametrize("keep_order", [False, True])
def test_interrupted_run_resumes_to_the_same_shards(tmp_path, monkeypatch, keep_order):
    straight = tmp_path / "straight"
    write_shards(SOURCE, straight, shard_size=4, keep_order=keep_order, progress=False)

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
        write_shards(SOURCE, resumed, shard_size=4, keep_order=keep_order, progress=False)
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

    write_shards(SOURCE, resumed, shard_size=4, keep_order=keep_order, progress=False)
    assert (resumed / "train-000000.tar").stat().st_mtime_ns == first_shard  # kept, not rewritten
    final = sorted(p.name for p in resumed.iterdir())  # temporary and progress files are gone
    assert final == sorted(p.name for p in straight.iterdir())
    for name in final:
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name


def test_resume_with_other_options_is_an_error(tmp_path):
    write_shards(SOURCE, tmp_path, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(SOURCE, tmp_path, shard_size=5, progress=False)
    with pytest.raises(ValueError, match="'seed': 0.*'seed': 1"):
        write_shards(SOURCE, tmp_path, shard_size=4, seed=1, progress=False)
    with pytest.raises(ValueError, match="'order': 'shuffled'.*'order': 'source'"):
        write_shards(SOURCE, tmp_path, shard_size=4, keep_order=True, progress=False)


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="shard_size=0"):
        write_shards(SOURCE, tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="'gif'.*png, jpg"):
        write_shards(SOURCE, tmp_path, image_format="gif")


def test_max_side_and_jpeg(tmp_path):
    write_shards(SOURCE, tmp_path, shard_size=30, image_format="jpg", max_side=20, progress=False)
    sample = next(iter(build_source(f"wds:{tmp_path}/train-index.json?shuffle=0")))
    assert sample["image"].shape == (3, 20, 20) and sample["mask"].shape == (20, 20)
    assert _tar_names(tmp_path / "train-000000.tar")[1].endswith(".jpg")


def test_unreadable_source_image_is_skipped(tmp_path):
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="9.png.*skipped|skipped.*9.png"):
        index = write_shards(f"folder:{tmp_path / 'imgs'}", tmp_path / "out", shard_size=10, progress=False)
    assert index["samples"] == 3 and index["class_names"] == ["cat"]  # left out, not replaced by another
    images = [s["image"] for s in build_source(f"wds:{tmp_path}/out/train-index.json?shuffle=0")]
    assert sorted(int(round(float(im[0, 0, 0]) * 255)) for im in images) == [0, 40, 80]
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


def test_unlabelled_folder_writes_no_label(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    index = write_shards(f"folder:{tmp_path / 'imgs'}", tmp_path / "out", progress=False)
    assert index["members"] == ["png"] and index["class_names"] == []
    assert all("label" not in s for s in build_source(f"wds:{tmp_path}/out/train-index.json"))


def test_command_line_order_options(tmp_path, capsys):
    args = [SOURCE, str(tmp_path), "--shard-size", "5", "--keep-order", "--no-progress"]
    assert make_shards(args) == 0
    assert json.loads(capsys.readouterr().out)["options"]["order"] == "source"
    assert _keys(tmp_path / "train-000000.tar") == [0, 1, 2, 3, 4]
    assert make_shards([SOURCE, str(tmp_path / "s"), "--seed", "7", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["seed"] == 7


# A class-ordered folder scaled down from ImageNet's: one class per shard (1281 images a class,
# shards of 1000 there) and a shuffle buffer as deep as a shard (the default 1000); the batch is half
# the buffer (64 of 1000 in the recipes) so that a random batch holds many classes at this scale.
CLASSES, PER_CLASS, SHARD, BUFFER, BATCH = 32, 32, 32, 32, 16


@pytest.fixture(scope="module")
def class_ordered(tmp_path_factory):
    root = tmp_path_factory.mktemp("ordered")
    write_class_ordered_folder(root / "folder", CLASSES, PER_CLASS)
    return root


@pytest.mark.parametrize("keep_order", [False, True])
def test_shuffled_writing_mixes_the_classes_of_a_batch(class_ordered, keep_order):
    out = class_ordered / f"keep{keep_order}"
    source = f"folder:{class_ordered}/folder"
    write_shards(source, out, shard_size=SHARD, keep_order=keep_order, progress=False)
    distinct = mean_distinct_labels(f"wds:{out}/train-index.json?shuffle={BUFFER}", BATCH, batches=60)
    random_permutation = expected_distinct_labels([PER_CLASS] * CLASSES, BATCH)  # 12.8 of 32
    if keep_order:  # a batch of the few classes the buffer holds (3.7)
        assert distinct < 0.4 * random_permutation
    else:
        assert distinct >= 0.9 * random_permutation  # 13.0


def test_expected_distinct_labels_of_a_random_permutation():
    assert expected_distinct_labels([1] * 10, 4) == pytest.approx(4)  # all distinct
    assert expected_distinct_labels([5, 5], 6) == pytest.approx(2)  # 6 of 10 cannot all be one class
    # one class of two in a batch of 2 from 2 + 2: P(both from the same class) = 2 * (2/4 * 1/3)
    assert expected_distinct_labels([2, 2], 2) == pytest.approx(2 - 2 * (2 / 4) * (1 / 3))
