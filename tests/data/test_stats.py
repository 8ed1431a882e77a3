"""Source statistics: per-channel mean/std (data.mean: auto) and the greyscale check."""

import numpy as np
import pytest
from PIL import Image

from mimkit.data.stats import channel_stats, looks_greyscale


def _folder(root, images, mode):
    for i, array in enumerate(images):
        path = root / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode=mode).save(path)
    return f"folder:{root}"


def test_channel_stats_match_the_known_pixels_of_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8) for i in range(9)]
    uri = _folder(tmp_path, images, "RGB")
    pixels = np.concatenate([a.reshape(-1, 3) for a in images]).astype(np.float64) / 255
    stats = channel_stats(uri, channels=3, images=100)
    np.testing.assert_allclose(stats.mean, pixels.mean(0), atol=1e-3)
    np.testing.assert_allclose(stats.std, pixels.std(0), atol=1e-3)
    grey = channel_stats(uri, channels=1, images=100)
    luma = np.concatenate(
        [np.round(a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).ravel() for a in images]
    )
    assert grey.channels == 1
    np.testing.assert_allclose(grey.mean, [luma.mean() / 255], atol=1e-3)
    np.testing.assert_allclose(grey.std, [luma.std() / 255], atol=1e-3)


def test_channel_stats_sample_a_subset_and_reject_constant_channels(tmp_path):
    rng = np.random.default_rng(1)
    uri = _folder(tmp_path / "a", [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(10)], "L")
    few = channel_stats(uri, channels=1, images=2)
    assert few != channel_stats(uri, channels=1, images=10)  # only two images were read
    flat = _folder(tmp_path / "b", [np.full((8, 8), 7, np.uint8)] * 2, "L")
    with pytest.raises(ValueError, match="constant channel"):
        channel_stats(flat, channels=1)
    with pytest.raises(ValueError, match="channels=4"):
        channel_stats(uri, channels=4)


def test_looks_greyscale_sees_grey_stored_as_rgb(tmp_path):
    rng = np.random.default_rng(2)
    grey = [np.repeat(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), 3, axis=2) for _ in range(4)]
    assert looks_greyscale(_folder(tmp_path / "grey", grey, "RGB"))
    colour = [*grey[:3], rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)]
    assert not looks_greyscale(_folder(tmp_path / "colour", colour, "RGB"))
    assert not looks_greyscale("synthetic:shapes?size=16&train=4&val=2")
