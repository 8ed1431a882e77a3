"""The ``hf:`` source: Hugging Face datasets saved with save_to_disk, labelled or not, damaged images
skipped and counted, and a pretraining run on one."""

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import build_source
from mimkit.data.bad import BadSampleWarning
from mimkit.data.hf import HuggingFaceSource
from mimkit.train.loader import build_loader
from tests.helpers import subprocess_env
from tests.train.test_pretrain import TINY

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG") if mode else Image.fromarray(array).save(
        out, format="PNG"
    )
    return out.getvalue()


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_png(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(n)]


def _save(path: Path, splits: dict[str, dict], labelled: bool = True) -> Path:
    features = {"picture": datasets.Image()}
    if labelled:
        features["kind"] = datasets.ClassLabel(names=["cat", "dog", "fox"])
    features["note"] = datasets.Value("string")
    built = {
        name: datasets.Dataset.from_dict(
            {
                "picture": [{"bytes": b, "path": None} for b in cols["images"]],
                **({"kind": cols["labels"]} if labelled else {}),
                "note": ["x"] * len(cols["images"]),
            },
            features=datasets.Features(features),
        )
        for name, cols in splits.items()
    }
    (datasets.DatasetDict(built) if len(built) > 1 else built["only"]).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "pets"
    train = {"images": _images(12), "labels": [i % 3 for i in range(12)]}
    val = {"images": _images(6, seed=1), "labels": [2] * 6}
    return _save(root, {"train": train, "validation": val})


def test_a_saved_dataset_dict_gives_both_splits_with_its_class_names(labelled):
    train, val = build_source(f"hf:{labelled}", "train"), build_source(f"hf:{labelled}", "val")
    assert isinstance(train, HuggingFaceSource) and (len(train), len(val)) == (12, 6)
    assert train.class_names == ["cat", "dog", "fox"] and train.label_column == "kind"
    sample = train[4]
    assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
    assert int(sample["label"]) == 1 and int(val[0]["label"]) == 2
    expected = np.array(Image.open(io.BytesIO(_images(12)[4])))
    assert torch.equal(
        (sample["image"] * 255).round().to(torch.uint8), torch.from_numpy(expected).permute(2, 0, 1)
    )
    unlabelled = build_source(f"hf:{labelled}?label=none", "train")
    assert "label" not in unlabelled[0] and unlabelled.class_names == []


def test_a_single_dataset_without_labels_serves_both_splits_unlabelled(tmp_path):
    path = _save(tmp_path / "flat", {"only": {"images": _images(5)}}, labelled=False)
    for split in ("train", "val"):
        source = build_source(f"hf:{path}", split)
        assert len(source) == 5 and source.label_column is None and "label" not in source[2]


def test_greyscale_16_bit_and_palette_images_come_out_rgb(tmp_path):
    grey16 = _png(np.full((8, 8), 65535, dtype=np.uint16))
    palette = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).convert("P").save(palette, format="PNG")
    rgba = _png(np.full((8, 8, 4), 200, dtype=np.uint8))
    path = _save(tmp_path / "modes", {"only": {"images": [grey16, palette.getvalue(), rgba]}}, labelled=False)
    source = build_source(f"hf:{path}")
    first = source[0]["image"]
    assert first.shape == (3, 8, 8) and torch.allclose(first, torch.ones_like(first))  # 65535 is white
    assert source[1]["image"].shape == (3, 8, 8)
    assert torch.allclose(source[2]["image"], torch.full((3, 8, 8), 200 / 255))


def test_images_cut_mid_data_or_garbage_are_skipped_counted_and_replaced(tmp_path):
    images = _images(8)
    images[2] = images[2][: len(images[2]) // 2]  # cut inside the compressed data
    images[5] = b"not an image at all"
    path = _save(tmp_path / "damaged", {"only": {"images": images, "labels": [0] * 8}})
    source = build_source(f"hf:{path}")
    with pytest.warns(BadSampleWarning, match=r"cannot decode image 2 of hf:.*damaged"):
        sample = source[2]
    assert sample["image"].shape == (3, 24, 24)  # a replacement, drawn at random
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        for i in range(len(source)):
            source[i]
    assert source.counts.good == 9 and source.counts.bad >= 2


def test_the_training_loader_reads_it_from_two_workers(labelled):
    loader, sampler = build_loader(
        build_source(f"hf:{labelled}"), 4, 4, rank=0, world_size=1, seed=0, workers=2, pin_memory=False
    )
    sampler.set_epoch(0)
    labels = torch.cat([batch["label"] for batch in loader])
    assert len(labels) == 12 and sorted(labels.tolist()) == sorted(i % 3 for i in range(12))
    assert sampler.counts() == (12, 0)


def test_bad_paths_columns_and_options_name_the_valid_ones(labelled, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_source(f"hf:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no dataset written by"):
        build_source(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="no column 'photo' .*picture, kind, note"):
        build_source(f"hf:{labelled}?image=photo")
    with pytest.raises(ValueError, match="column 'note' is Value, not ClassLabel .*ClassLabel columns: kind"):
        build_source(f"hf:{labelled}?label=note")
    with pytest.raises(ValueError, match="bad option size='3' .*valid options: image=NAME, label=NAME"):
        build_source(f"hf:{labelled}?size=3")
    with pytest.raises(ValueError, match="hf: needs the directory"):
        build_source("hf:")
    only_train = _save(tmp_path / "train_only", {"train": {"images": _images(2), "labels": [0, 1]}, "extra": {
        "images": _images(1), "labels": [0]}})  # fmt: skip
    with pytest.raises(ValueError, match="splits train, extra, none of them validation or val or test"):
        build_source(f"hf:{only_train}", "val")


def test_pretraining_runs_on_an_hf_source(labelled, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "pretrain.py"), str(recipe), f"run.dir={run}"]
    cmd += [f"data.source=hf:{labelled}", "train.max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["samples_read"] == 16
    assert (run / "encoder.safetensors").is_file()
