"""The folder source: class indices, train/val subfolders, and errors that name the bad file."""

import pytest
import torch
from PIL import Image

from mimkit.data import ImageFolderSource, build_source

COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "ant": (10, 10, 200)}


def write_image(path, colour, size=(20, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def tree(tmp_path):
    for name in ("dog", "cat", "ant"):  # written unsorted on purpose
        for j in range(2):
            write_image(tmp_path / name / f"{j}.png", COLOURS[name], size=(20 + j, 16))
    return tmp_path


def test_labels_follow_sorted_class_folders(tree):
    ds = build_source(f"folder:{tree}")
    assert ds.class_names == ["ant", "cat", "dog"]
    assert len(ds) == 6
    for i, (path, label) in enumerate(ds.samples):
        sample = ds[i]
        assert sorted(sample) == ["image", "label"]
        assert int(sample["label"]) == label == ds.class_names.index(path.split("/")[-2])
        image = sample["image"]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and image.shape[1] == 16
        expected = torch.tensor(COLOURS[ds.class_names[label]]) / 255
        assert torch.allclose(image[:, 0, 0], expected)


def test_nested_grayscale_and_hidden_files(tmp_path):
    write_image(tmp_path / "a" / "deep" / "x.png", 128, mode="L")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "notes.txt").write_text("skipped")
    ds = ImageFolderSource(tmp_path)
    assert len(ds) == 1 and ds.class_names == ["a"]
    assert ds[0]["image"].shape == (3, 16, 20)


def test_split_subfolders_share_class_indices(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", COLOURS["ant"])
    write_image(tmp_path / "train" / "b" / "0.png", COLOURS["cat"])
    write_image(tmp_path / "val" / "c" / "0.png", COLOURS["dog"])
    train = build_source(f"folder:{tmp_path}", "train")
    val = build_source(f"folder:{tmp_path}", "val")
    assert train.class_names == val.class_names == ["a", "b", "c"]
    assert [int(s["label"]) for s in train] == [0, 1]
    assert [int(s["label"]) for s in val] == [2]


def test_missing_split_folder_is_named(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", COLOURS["ant"])
    with pytest.raises(FileNotFoundError, match="val/"):
        ImageFolderSource(tmp_path, "val")


def test_non_image_file_is_named_with_accepted_extensions(tree):
    (tree / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt") as info:
        build_source(f"folder:{tree}")
    assert ".png" in str(info.value) and ".jpg" in str(info.value)


def test_stray_file_beside_class_folders_is_named(tree):
    (tree / "README").write_text("hello")
    with pytest.raises(ValueError, match="README"):
        ImageFolderSource(tree)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named_when_loaded(tree, damage):
    path = tree / "dog" / "broken.jpg"
    if damage == "garbage":
        path.write_bytes(b"this is not a jpeg")
    else:
        write_image(path, (1, 2, 3), size=(64, 64))
        path.write_bytes(path.read_bytes()[:200])
    ds = ImageFolderSource(tree)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg"))
    ds[index - 1]
    with pytest.raises(ValueError, match="broken.jpg"):
        ds[index]


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        ImageFolderSource(tmp_path / "empty")
