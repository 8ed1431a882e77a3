"""The folder source: layouts (labelled, unlabelled, train/val), skipped files, bad images, image modes."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms.v2 import functional as F

from mimkit.data import ImageFolderSource, Normalization, build_source, build_transform, load_image
from mimkit.data.bad import BadSampleWarning

COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "ant": (10, 10, 200)}


def write_image(path, colour, size=(20, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def noisy_image_bytes(fmt: str, seed: int = 0) -> bytes:
    """A 64x64 noise image encoded as ``fmt``: noise does not compress, so pixel data fill the file."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path):
    for name in ("dog", "cat", "ant"):  # written unsorted on purpose
        for j in range(2):
            write_image(tmp_path / name / f"{j}.png", COLOURS[name], size=(20 + j, 16))
    return tmp_path


def _index_of(ds, name):
    return next(i for i, (p, _) in enumerate(ds.samples) if p.endswith(name))


# ------------------------------------------------------------------------------------------ layouts


def test_labels_follow_sorted_class_folders(tree):
    ds = build_source(f"folder:{tree}")
    assert ds.class_names == ["ant", "cat", "dog"] and ds.unlabelled_reason is None
    assert len(ds) == 6
    for i, (path, label) in enumerate(ds.samples):
        sample = ds[i]
        assert sorted(sample) == ["image", "label"]
        assert int(sample["label"]) == label == ds.class_names.index(path.split("/")[-2])
        image = sample["image"]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and image.shape[1] == 16
        expected = torch.tensor(COLOURS[ds.class_names[label]]) / 255
        assert torch.allclose(image[:, 0, 0], expected)
    assert (ds.counts.good, ds.counts.bad) == (6, 0)


def test_nested_grayscale_and_hidden_files_skip_silently(tmp_path):
    write_image(tmp_path / "a" / "deep" / "x.png", 128, mode="L")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "notes.txt").write_text("skipped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hidden files are not worth a warning
        ds = ImageFolderSource(tmp_path)
    assert len(ds) == 1 and ds.class_names == ["a"]
    assert ds[0]["image"].shape == (3, 16, 20)


def test_class_folders_with_images_at_mixed_depths_stay_labelled(tmp_path):
    write_image(tmp_path / "a" / "0.png", COLOURS["ant"])
    write_image(tmp_path / "a" / "x" / "y" / "1.png", COLOURS["ant"])
    write_image(tmp_path / "b" / "z" / "2.png", COLOURS["cat"])
    ds = ImageFolderSource(tmp_path)
    assert ds.class_names == ["a", "b"]
    assert [label for _, label in ds.samples] == [0, 0, 1]


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


def test_flat_folder_reads_unlabelled(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.jpg", (10 * i, 20, 30))
    ds = build_source(f"folder:{tmp_path}")
    assert len(ds) == 3 and ds.class_names == []
    assert "sit directly in" in ds.unlabelled_reason and "0.jpg" in ds.unlabelled_reason
    assert all(label is None for _, label in ds.samples)
    batch = default_collate([ds[i] for i in range(3)])
    assert sorted(batch) == ["image"] and batch["image"].shape == (3, 3, 16, 20)
    assert "unlabelled" in repr(ds)


def test_nested_layout_without_class_folders_reads_every_image_unlabelled(tmp_path):
    for relative in ("top.png", "a/1.png", "a/deeper/2.png", "b/3.png"):
        write_image(tmp_path / relative, COLOURS["cat"])
    ds = ImageFolderSource(tmp_path)
    assert ds.class_names == [] and len(ds) == 4
    names = sorted(p.removeprefix(f"{tmp_path}/") for p, _ in ds.samples)
    assert names == ["a/1.png", "a/deeper/2.png", "b/3.png", "top.png"]
    assert all("label" not in ds[i] for i in range(len(ds)))


def test_one_image_beside_class_folders_makes_the_folder_unlabelled(tree):
    write_image(tree / "stray.png", COLOURS["cat"])
    ds = ImageFolderSource(tree)
    assert ds.class_names == [] and len(ds) == 7 and "stray.png" in ds.unlabelled_reason


def test_split_layout_is_decided_over_both_splits(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", COLOURS["ant"])
    write_image(tmp_path / "val" / "0.png", COLOURS["ant"])  # val has no class folders
    train, val = (ImageFolderSource(tmp_path, split) for split in ("train", "val"))
    assert train.class_names == val.class_names == []
    assert "label" not in train[0] and "label" not in val[0]  # both splits yield the same keys


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        ImageFolderSource(tmp_path / "empty")


def test_non_image_files_are_ignored_with_one_summary_line(tree):
    (tree / "cat" / "notes.txt").write_text("not an image")
    (tree / "dog" / "meta.json").write_text("{}")
    (tree / "README").write_text("hello")  # beside the class folders: still labelled
    with pytest.warns(UserWarning) as record:
        ds = build_source(f"folder:{tree}")
    assert len(record) == 1
    message = str(record[0].message)
    assert f"ignored 3 non-image files in {tree}" in message and "(e.g. cat/notes.txt)" in message
    assert ".png" in message  # says which extensions count as images
    assert len(ds) == 6 and ds.class_names == ["ant", "cat", "dog"]


# --------------------------------------------------------------------------------------- bad images


def _damage(path, how):
    """Damage ``path`` the way disks and networks do; it already holds a valid image of its format."""
    if how == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "deleted after the scan":
        path.unlink()
    else:  # cut mid-data: the header is intact, the pixel data stops halfway
        fmt = {"truncated jpeg": "JPEG", "truncated png": "PNG"}[how]
        data = noisy_image_bytes(fmt)
        path.write_bytes(data[: len(data) // 2])


DAMAGE = ["truncated jpeg", "truncated png", "garbage", "zero bytes", "deleted after the scan"]


def _other_index_with(ds, image, index):
    """The index other than ``index`` whose image equals ``image`` (an untransformed source)."""
    return next(i for i in range(len(ds)) if i != index and torch.equal(ds[i]["image"], image))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_bad_image_is_skipped_named_counted_and_replaced(tree, how):
    suffix = ".png" if how == "truncated png" else ".jpg"
    broken = tree / "cat" / f"broken{suffix}"
    broken.write_bytes(noisy_image_bytes("PNG" if suffix == ".png" else "JPEG", seed=1))
    ds = ImageFolderSource(tree)
    index = _index_of(ds, broken.name)
    _damage(broken, how)
    with pytest.warns(BadSampleWarning) as record:
        sample = ds[index]
    assert record and all(f"broken{suffix}" in str(r.message) for r in record)
    assert "cannot decode image file" in str(record[0].message)
    assert (ds.counts.good, ds.counts.bad) == (1, len(record))  # one bad read per failed attempt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        stand_in = _other_index_with(ds, sample["image"], index)  # a valid image of the folder
    assert int(sample["label"]) == ds.samples[stand_in][1]  # with its own label
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # mimkit never relaxes PIL's check


def test_the_replacement_is_the_same_in_every_process_and_iteration_still_ends(tree):
    (tree / "cat" / "cut.png").write_bytes(noisy_image_bytes("PNG")[:2000])
    first, second = ImageFolderSource(tree), ImageFolderSource(tree)
    index = _index_of(first, "cut.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        assert torch.equal(first[index]["image"], second[index]["image"])
        assert len(list(first)) == len(first)  # __getitem__ still raises IndexError past the end
    with pytest.raises(IndexError):
        first[len(first)]


def test_a_folder_where_nothing_decodes_is_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    ds = ImageFolderSource(tmp_path)
    with pytest.warns(BadSampleWarning), pytest.raises(ValueError, match=r"none of 33 images tried .*0.png"):
        ds[0]
    assert ds.counts.bad == 33 and ds.counts.good == 0


def test_load_image_still_raises_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    data = noisy_image_bytes("JPEG")
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode image file .*cut.jpg"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
@pytest.mark.parametrize("as_path", [False, True])
def test_load_image_gives_pil_to_tensor_pixels_and_layout(tmp_path, fmt, as_path):
    data = noisy_image_bytes(fmt)
    path = tmp_path / f"noise.{fmt.lower()}"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        expected = F.pil_to_tensor(img.convert("RGB"))
    image = load_image(path if as_path else data)
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert image.stride() == expected.stride()  # channels-last, as pil_to_tensor lays it out
    assert torch.equal(image, expected)
    image += 1  # a tensor of its own, writable


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0 chroma
@pytest.mark.parametrize("progressive", [False, True])
def test_jpegs_decode_to_the_pixels_pil_gives_them(mode, subsampling, progressive):
    pixels = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    options = {"quality": 85, "subsampling": subsampling, "progressive": progressive}
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", **options)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        expected = F.pil_to_tensor(img.convert("RGB"))
    image = load_image(data)
    assert image.shape == (3, 48, 40) and torch.equal(image, expected)
    with pytest.raises(ValueError, match="cannot decode image bytes"):
        load_image(data[: len(data) * 2 // 3])  # cut inside the scan: no end-of-image marker


def test_counts_from_two_loader_workers_reach_the_main_process(tmp_path):
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(noisy_image_bytes("PNG", seed=i))
    for i in (2, 5):
        path = tmp_path / f"{i}.png"
        path.write_bytes(path.read_bytes()[:3000])
    counts = {}
    for workers in (0, 2):
        ds = ImageFolderSource(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadSampleWarning)
            sizes = [len(batch["image"]) for batch in DataLoader(ds, batch_size=2, num_workers=workers)]
        assert sizes == [2, 2, 2, 2]  # a bad image never shortens a batch
        counts[workers] = (ds.counts.good, ds.counts.bad)
    assert counts[2] == counts[0] and counts[0][0] == 8 and counts[0][1] >= 2


# --------------------------------------------------------------------------------------- image modes


def _luma(rgb):
    return [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in rgb]


def _palette_image(transparency: bool) -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    if transparency:
        img.info["transparency"] = 0
    return img


def _greys(*values):
    return [(v, v, v) for v in values]


def _wide_grey(values, mode):
    """A 16-bit greyscale image (I;16), or the same values in 32-bit integer mode I."""
    image = Image.fromarray(np.array([values], dtype=np.uint16))
    return image if mode == "I;16" else image.convert("I")


def _raw(mode, *values):
    return lambda: Image.frombytes(mode, (3, 1), bytes(values))


_COLOURS = [(10, 20, 30), (200, 100, 50), (0, 255, 0)]
# each case: the image (3 pixels wide, 1 high), the file it is saved as, and its expected RGB pixels
MODES = {
    "L": (_raw("L", 0, 77, 255), "png", _greys(0, 77, 255)),
    "P": (lambda: _palette_image(False), "png", _COLOURS),
    "P+transparency": (lambda: _palette_image(True), "png", _COLOURS),
    # alpha is dropped: each pixel keeps its stored colour, opaque or not
    "RGBA": (_raw("RGBA", 10, 20, 30, 0, 200, 100, 50, 128, 1, 2, 3, 255), "png", [*_COLOURS[:2], (1, 2, 3)]),
    "LA": (_raw("LA", 7, 0, 77, 128, 250, 255), "png", _greys(7, 77, 250)),
    # 16-bit: v scales to round(v / 257); PIL's own conversion clips 19789 and 1000 to 255
    "I;16": (lambda: _wide_grey([19789, 1000, 65535], "I;16"), "png", _greys(77, 4, 255)),
    "I": (lambda: _wide_grey([19789, 1000, 65535], "I"), "tif", _greys(77, 4, 255)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_image_modes_decode_to_the_expected_pixels(tmp_path, mode, channels):
    make, extension, rgb = MODES[mode]
    path = tmp_path / f"image.{extension}"
    make().save(path)
    opened = Image.open(path).mode
    assert opened == mode.removesuffix("+transparency")  # the file really is in that mode
    transform = build_transform("none", 1, Normalization.imagenet(channels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's warning on dropping a palette's transparency
        image = ImageFolderSource(tmp_path, transform=transform)[0]["image"]
    pixels = (image * 255).round().to(torch.uint8)
    expected = torch.tensor(rgb if channels == 3 else [[v] for v in _luma(rgb)], dtype=torch.uint8).T
    assert pixels.shape == (channels, 1, 3)
    assert torch.equal(pixels[:, 0], expected), f"{mode}: got {pixels[:, 0].tolist()}"


def test_pil_set_to_load_truncated_images_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library may do
    path = tmp_path / "cut.png"
    data = noisy_image_bytes("PNG")
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="LOAD_TRUNCATED_IMAGES is True .* not counted as bad"):
        load_image(path)  # decodes, padded: the one case a cut file passes
