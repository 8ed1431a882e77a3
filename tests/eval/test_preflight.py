"""The checks before the first forward pass, on their own: labels without an encoder, shots, sizes, memory."""

import pytest
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from mimkit.data import build_source
from mimkit.eval import preflight
from mimkit.eval.preflight import (
    check_fits,
    check_img_size,
    check_neighbours,
    check_shots,
    format_bytes,
    source_labels,
)


def test_labels_of_the_embedded_sets_come_from_the_scenes_alone():
    source = build_source("synthetic:shapes?size=32&train=30&val=5", "train", None)
    want = [int(source[i]["label"]) for i in range(30)]
    assert source_labels(source).tolist() == want
    assert source_labels(source, workers=2).tolist() == want


def test_labels_of_a_folder_come_from_its_listing(tmp_path):
    for name, count in (("cat", 2), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    source = build_source(f"folder:{tmp_path}", "train", None)
    assert source_labels(source).tolist() == [0, 0, 1, 1, 1]


def test_a_stream_has_no_labels_before_it_is_read_and_only_its_size_is_checked():
    class Stream(IterableDataset):
        class_names = ("a", "b", "c")

        def __iter__(self):
            yield from ({"image": torch.zeros(3, 4, 4), "label": i % 3} for i in range(9))

    assert source_labels(Stream()) is None
    check_shots(None, [3], 9, Stream())
    with pytest.raises(
        ValueError, match="--shots 4 needs 4 images of each of 3 classes, 12 in all.*largest valid is 3"
    ):
        check_shots(None, [1, 4], 9, Stream())


def test_shots_name_the_smallest_class_and_the_largest_valid_value():
    source = build_source("synthetic:shapes?size=32&train=30&val=5", "train", None)
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 7)
    check_shots(labels, [1, 2], 14, source)
    with pytest.raises(
        ValueError, match=r"class 'square' \(1\) has 2 training images, fewer than 3 per class"
    ):
        check_shots(labels, [1, 3], 14, source)
    with pytest.raises(ValueError, match="must be positive integers"):
        check_shots(labels, [0], 14, source)


def test_neighbours_and_image_sizes():
    check_neighbours([10, 20], 20)
    with pytest.raises(ValueError, match="--ks 21 exceeds the 20 training images; the largest valid is 20"):
        check_neighbours([10, 21], 20)
    check_img_size(64, 8)
    with pytest.raises(ValueError, match="nearest valid sizes are 56 and 64"):
        check_img_size(60, 8)
    with pytest.raises(ValueError, match="nearest valid size is 16"):
        check_img_size(10, 16)


def test_memory_checks_against_the_free_memory(monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 10 * 2**20)
    assert check_fits(9 * 2**20, "cpu", "x", "y") == 10 * 2**20  # 90% of the free memory may be planned
    with pytest.raises(
        ValueError, match=r"the bank needs 9.5 MiB on cpu, more than the 10.0 MiB free .*; shrink it"
    ):
        check_fits(int(9.5 * 2**20), "cpu", "the bank", "shrink it")
    monkeypatch.setattr(preflight, "available_bytes", lambda device: None)
    assert check_fits(2**60, "cpu", "x", "y") is None  # unknown: nothing to check against
    assert (format_bytes(512), format_bytes(3 * 2**20), format_bytes(5 * 2**30)) == (
        "0.5 KiB",
        "3.0 MiB",
        "5.00 GiB",
    )


def test_the_host_reports_some_free_memory():
    free = preflight.available_bytes("cpu")
    assert free is None or free > 0
