"""The shortcuts synthetic:shapes draws with give what drawing on the whole image gives, to the bit."""

import numpy as np
import pytest

from mimkit.data.synthetic import (
    _REACH,
    _SHAPE_TESTS,
    SHAPES,
    ShapeObject,
    _pixel_mean,
    _rasterise,
    _rasterise_near,
)


@pytest.mark.parametrize("shape", SHAPES)
def test_no_shape_reaches_past_its_box(shape):
    u, v = np.meshgrid(*[np.linspace(-2.0, 2.0, 1601, dtype=np.float32)] * 2)
    inside = _SHAPE_TESTS[shape](u, v)
    reach = np.hypot(u, v)[inside].max()
    assert 0.7 < reach <= _REACH


def _random_objects(rng, size, n):
    for _ in range(n):
        radius = max(float(rng.uniform(0.05, 0.4)) * size, 3.0)
        # centres anywhere, also off the image, so boxes get clipped at every edge
        cx, cy = rng.uniform(-radius, size + radius, 2)
        shape, angle = SHAPES[rng.integers(len(SHAPES))], float(rng.uniform(-4.0, 4.0))
        yield ShapeObject(shape, (float(cx), float(cy)), radius, angle, (0.0, 0.0, 0.0))


@pytest.mark.parametrize("size", [16, 37, 64, 96])
def test_rasterising_near_the_shape_equals_rasterising_everywhere(size):
    rng = np.random.default_rng(size)
    for obj in _random_objects(rng, size, 300):
        drawn, v = _rasterise(obj, size)
        (rows, cols), near, near_v = _rasterise_near(obj, size)
        assert np.array_equal(near, drawn[rows, cols])
        assert near_v.tobytes() == v[rows, cols].tobytes()
        outside = drawn.copy()
        outside[rows, cols] = False
        assert not outside.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [16, 64, 96])
def test_pixel_mean_is_the_interleaved_images_mean_to_the_bit(dtype, size):
    rng = np.random.default_rng(size)
    for _ in range(20):
        planes = (rng.random((3, size, size)) * rng.uniform(0.1, 2.0)).astype(dtype)
        expected = np.ascontiguousarray(planes.transpose(1, 2, 0)).mean(axis=(0, 1))
        got = _pixel_mean(planes)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
