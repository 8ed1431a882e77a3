"""build_source: URI parsing, options, and errors that name the bad value and the valid ones."""

import pickle

import pytest
import torch

from mimkit.data import SOURCE_SCHEMES, SyntheticShapes, build_source, pretrain_transform, register_scheme


def test_schemes_registered():
    assert {"synthetic", "folder"} <= set(SOURCE_SCHEMES)


def test_synthetic_defaults_and_options():
    ds = build_source("synthetic:shapes")
    assert isinstance(ds, SyntheticShapes) and len(ds) == 10000 and ds.size == 64 and ds.seed == 0
    assert len(build_source("synthetic:shapes", "val")) == 1000
    ds = build_source("synthetic:shapes?size=32&train=5&val=3&seed=7")
    assert len(ds) == 5 and ds[0]["image"].shape == (3, 32, 32)
    assert len(build_source("synthetic:shapes?size=32&train=5&val=3&seed=7", "val")) == 3
    assert torch.equal(ds[2]["image"], SyntheticShapes(size=32, seed=7)[2]["image"])


@pytest.mark.parametrize(
    "uri, split, named",
    [
        ("ftp:x", "train", ["'ftp'", "synthetic:", "folder:"]),
        ("shapes", "train", ["'shapes'", "synthetic:"]),
        ("synthetic:nope", "train", ["'nope'", "shapes"]),
        ("synthetic:shapes?colour=red", "train", ["'colour'", "size", "seed"]),
        ("synthetic:shapes?size=big", "train", ["size='big'"]),
        ("synthetic:shapes?size=32&size=64", "train", ["'size'"]),
        ("synthetic:shapes?size", "train", ["size"]),
        ("synthetic:shapes", "test", ["'test'", "train, val"]),
        ("folder:", "train", ["folder:"]),
    ],
)
def test_errors_name_the_bad_value(uri, split, named):
    with pytest.raises(ValueError) as info:
        build_source(uri, split)
    for text in named:
        assert text in str(info.value)


def test_scheme_names_are_unique():
    with pytest.raises(ValueError, match="synthetic"):
        register_scheme("synthetic")(lambda spec, split, transform: None)


def test_sources_pickle_for_worker_processes():
    ds = build_source("synthetic:shapes?size=32", transform=pretrain_transform(32))
    clone = pickle.loads(pickle.dumps(ds))
    torch.manual_seed(3)
    a = ds[11]
    torch.manual_seed(3)
    b = clone[11]
    assert all(torch.equal(a[k], b[k]) for k in a)
