"""The embedded synthetic set: determinism, labels and masks, splits, object counts, speed."""

import numpy as np
import pytest
import torch

from mimkit.data import SHAPES, SyntheticShapes
from mimkit.data.synthetic import _rasterise

N = 300


@pytest.fixture(scope="module")
def train_scenes():
    ds = SyntheticShapes("train")
    return [ds.scene(i) for i in range(N)]


def test_sample_dict():
    sample = SyntheticShapes("train")[0]
    assert sorted(sample) == ["image", "label", "mask"]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    assert sample["label"].shape == () and sample["label"].dtype == torch.long
    assert sample["mask"].shape == (64, 64) and sample["mask"].dtype == torch.long


def test_same_seed_same_samples_other_seed_differs():
    a, b, c = SyntheticShapes(seed=0), SyntheticShapes(seed=0), SyntheticShapes(seed=1)
    for i in (0, 1, 7, 9999):
        sa, sb, sc = a[i], b[i], c[i]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not torch.equal(sa["image"], sc["image"])
    assert torch.equal(a[-1]["image"], a[9999]["image"])


def test_label_is_the_class_covering_most_pixels(train_scenes):
    for scene in train_scenes:
        counts = np.bincount(scene.mask.ravel(), minlength=len(SHAPES) + 1)[1:]
        assert counts[scene.label] > 0
        assert scene.label == int(np.argmax(counts))
        assert (scene.mask == scene.label + 1).sum() == counts.max()


def test_one_to_three_visible_objects(train_scenes):
    object_counts = set()
    for scene in train_scenes:
        assert 1 <= len(scene.objects) <= 3
        object_counts.add(len(scene.objects))
        classes = set(np.unique(scene.mask)) - {0}
        assert classes == {SHAPES.index(o.shape) + 1 for o in scene.objects}
        assert all(o.visible_pixels > 0 for o in scene.objects)
        assert sum(o.visible_pixels for o in scene.objects) == (scene.mask > 0).sum()
    assert object_counts == {1, 2, 3}


def test_later_objects_occlude_earlier_ones(train_scenes):
    for scene in train_scenes[:50]:
        top = scene.objects[-1]
        drawn, _ = _rasterise(top, scene.mask.shape[0])
        assert (scene.mask[drawn] == SHAPES.index(top.shape) + 1).all()
        assert drawn.sum() == top.visible_pixels


def test_every_class_appears(train_scenes):
    assert {s.label for s in train_scenes} == set(range(len(SHAPES)))
    seen = set(np.unique(np.stack([s.mask for s in train_scenes])))
    assert seen == set(range(len(SHAPES) + 1))


def test_train_and_val_do_not_overlap(train_scenes):
    val = SyntheticShapes("val")
    train_images = {s.image.tobytes() for s in train_scenes}
    assert len(train_images) == N
    assert not train_images & {val.scene(i).image.tobytes() for i in range(N)}


def test_split_lengths_and_index_range():
    ds = SyntheticShapes("val", train=20, val=5)
    assert len(ds) == 5 and len(SyntheticShapes("train", train=20, val=5)) == 20
    with pytest.raises(IndexError, match="5"):
        ds[5]
    assert [int(s["label"]) for s in ds] == [int(ds[i]["label"]) for i in range(5)]


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"size": 8}, "size=8"),
        ({"train": 0}, "train=0"),
        ({"seed": -1}, "seed=-1"),
        ({"cache": 2}, "cache=2"),
    ],
)
def test_bad_arguments_are_named(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SyntheticShapes(**kwargs)


def test_other_sizes():
    scene = SyntheticShapes(size=16).scene(3)
    assert scene.image.shape == (16, 16, 3) and scene.mask.shape == (16, 16)
    assert SyntheticShapes(size=96)[0]["image"].shape == (3, 96, 96)


def test_cached_scenes_are_rendered_once_and_equal_fresh_ones():
    cached, fresh = SyntheticShapes("val", val=6, cache=1), SyntheticShapes("val", val=6)
    first = cached.scene(4)
    assert cached.scene(4) is first and cached.scene(-2) is first  # rendered once, negative index too
    assert fresh.scene(4) is not fresh.scene(4)
    np.testing.assert_array_equal(first.image, fresh.scene(4).image)
    for i in range(6):
        torch.testing.assert_close(cached[i], fresh[i])


def test_segmentation_off_leaves_the_mask_out_and_the_image_unchanged():
    from mimkit.data import build_source, build_transform

    uri = "synthetic:shapes?size=64&train=8&val=2&seed=3"
    transform = build_transform("pretrain", 32)
    with_mask, without = (
        build_source(uri, "train", transform),
        build_source(uri + "&segmentation=0", "train", transform),
    )
    for i in range(4):
        torch.manual_seed(i)
        a = with_mask[i]
        torch.manual_seed(i)
        b = without[i]
        assert "mask" in a and sorted(b) == ["image", "label"]
        torch.testing.assert_close(a["image"], b["image"])  # same crop and flip draws
