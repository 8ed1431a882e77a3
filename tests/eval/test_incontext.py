"""In-context segmentation (dense retrieval) and classification on tiny encoders and tiny data."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.incontext import benchmark_incontext
from mimkit.data import build_source
from mimkit.eval import ExtractSettings, incontext_segmentation
from mimkit.eval.incontext import build_memory, evaluate_memory, select_patches
from mimkit.eval.incontext_cls import incontext_episodes, interval, prototype_top1
from mimkit.eval.seg_data import patch_class_fractions, seg_source
from mimkit.models import create_backbone, save_backbone
from tests.eval import separable
from tests.eval import single_thread as _single_thread

single_thread = pytest.fixture(autouse=True)(_single_thread)

DATA = "synthetic:shapes?size=32&train=12&val=10"
QUIET = ExtractSettings(batch_size=64, progress=False)


@pytest.fixture(scope="module")
def encoder():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = create_backbone(
            "vit_tiny_patch16", img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2
        )
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- patch labels


def test_patch_class_fractions_by_hand():
    mask = torch.tensor(
        [
            [0, 0, 1, 2],
            [0, 1, 255, 255],
            [255, 255, 2, 2],
            [255, 255, 2, 1],
        ]
    )
    frac, valid = patch_class_fractions(mask[None], 2, 3, ignore_index=255)
    # Patches in raster order; fractions are over each patch's non-ignored pixels.
    want = torch.tensor([[3 / 4, 1 / 4, 0], [0, 1 / 2, 1 / 2], [0, 0, 0], [0, 1 / 4, 3 / 4]])
    torch.testing.assert_close(frac[0], want)
    assert valid[0].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="mask value 5 is outside the classes 0..2"):
        patch_class_fractions(torch.full((1, 2, 2), 5), 2, 3, ignore_index=255)


def test_rare_sampler_favours_patches_of_rare_classes():
    # One image of 8 patches: 7 of background only, 1 of a rare class only; keep 1 patch.
    frac = torch.zeros(1, 8, 2)
    frac[0, :7, 0] = 1
    frac[0, 7, 1] = 1
    valid = torch.ones(1, 8, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    picks = {
        s: sum(bool(select_patches(frac, valid, 1, s, g)[0, 7]) for _ in range(400))
        for s in ("rare", "random")
    }
    # rare: score 1*u against 7*u_i for the others, kept when u < 7 min(u_i): about 1/2 of draws.
    assert picks["rare"] > 150 and picks["random"] < 100  # random: 1/8
    none = select_patches(frac, valid, 3, "none", g)
    assert none[0].tolist() == [True] * 3 + [False] * 5
    invalid = valid.clone()
    invalid[0, :6] = False  # only 2 valid patches: a quota of 3 keeps those 2
    assert select_patches(frac, invalid, 3, "rare", g).sum() == 2


# ----------------------------------------------------------------------------- retrieval segmentation


def _oracle_miou(dataset, patch: int, num_classes: int) -> float:
    """mIoU of predicting each patch's own class fractions, upsampled bilinearly: the quantisation bound.

    Computed independently of the library: one-hot masks averaged over patches, summed
    intersections and unions over the whole set.
    """
    inter = torch.zeros(num_classes, dtype=torch.float64)
    union = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(len(dataset)):
        mask = dataset[i]["mask"]
        onehot = F.one_hot(mask, num_classes).permute(2, 0, 1).float()[None]
        frac = F.avg_pool2d(onehot, patch)
        pred = F.interpolate(frac, size=mask.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        for c in range(num_classes):
            inter[c] += ((pred == c) & (mask == c)).sum()
            union[c] += ((pred == c) | (mask == c)).sum()
    return float((inter[union > 0] / union[union > 0]).mean())


def test_self_retrieval_reaches_the_patch_quantisation_bound(encoder):
    val, names, ignore = seg_source(DATA, "val", "val", 32)
    memory = build_memory(encoder, val, len(names), ignore, extract=QUIET)
    assert len(memory) == len(val) * 64
    conf = evaluate_memory(encoder, memory, val, len(names), ignore, k=1, temperature=1e-4, extract=QUIET)
    bound = _oracle_miou(val, 4, len(names))
    assert 0.6 < bound < 0.95  # 4-px patches on 32-px shapes lose their boundaries
    assert conf.miou() == pytest.approx(bound, abs=1e-9)
    # A memory of other images cannot do as well.
    train, _, _ = seg_source(DATA, "train", "val", 32)
    other = build_memory(encoder, train, len(names), ignore, extract=QUIET)
    worse = evaluate_memory(encoder, other, val, len(names), ignore, k=1, temperature=1e-4, extract=QUIET)
    assert worse.miou() < bound - 0.05


def test_a_cap_at_least_the_patch_count_equals_an_unbounded_memory(encoder):
    train, names, ignore = seg_source(DATA, "train", "memory", 32)
    val, _, _ = seg_source(DATA, "val", "val", 32)
    kw = dict(aug_epochs=2, seed=3, extract=QUIET)
    unbounded = build_memory(encoder, train, len(names), ignore, memory_size=None, **kw)
    total = len(train) * 2 * 64
    assert len(unbounded) == total
    for sampler in ("none", "rare"):
        capped = build_memory(encoder, train, len(names), ignore, memory_size=total, sampler=sampler, **kw)
        assert torch.equal(capped.keys, unbounded.keys) and torch.equal(capped.values, unbounded.values)
    a = evaluate_memory(encoder, unbounded, val, len(names), ignore, extract=QUIET)
    b = evaluate_memory(encoder, capped, val, len(names), ignore, extract=QUIET)
    assert torch.equal(a.conf, b.conf)
    # A smaller cap keeps memory_size // (images x passes) patches per image and pass.
    small = build_memory(encoder, train, len(names), ignore, memory_size=total // 4, **kw)
    assert len(small) == len(train) * 2 * 16 and small.info["patches_per_image"] == 16
    # The passes draw different crops: the second pass's keys differ from the first's.
    half = len(unbounded) // 2
    assert not torch.equal(unbounded.keys[:half], unbounded.keys[half:])


def test_incontext_segmentation_records_every_setting(encoder):
    lines = []
    res = incontext_segmentation(encoder, DATA, memory_size=100, k=5, extract=QUIET, log=lines.append)
    assert lines and lines[0].startswith("memory bank: up to 96 patches x 32 dims (fp32 keys)")
    s = res["settings"]
    required = (
        "input_size",
        "patch_size",
        "memory_size",
        "patches_per_image",
        "aug_epochs",
        "k",
        "temperature",
    )
    required += ("normalisation", "seed", "sampler", "ignore_index", "backend", "key_dtype")
    for key in required:
        assert key in s, key
    assert (s["input_size"], s["patch_size"], s["memory_size"], s["patches_per_image"]) == (32, 4, 100, 8)
    r = res["results"]
    assert r["memory_patches"] <= 100 and 0 <= r["miou"] <= r["miou_hungarian"] <= 1
    assert set(r["per_class_iou"]) == {
        "background",
        "circle",
        "square",
        "triangle",
        "diamond",
        "cross",
        "ring",
        "star",
    }
    with pytest.raises(ValueError, match="unknown sampler 'often'; valid: rare, random, none"):
        incontext_segmentation(encoder, DATA, sampler="often", extract=QUIET, log=None)


# ----------------------------------------------------------------------------- VOC / ADE20K layouts


def _png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, i, i)])
        img = Image.fromarray(array, mode="L").convert("P")
    img.save(path)


def _fake_voc(root: Path) -> None:
    rng = np.random.default_rng(0)
    ids = {"train": ["a", "b"], "val": ["c"]}
    for split, names in ids.items():
        for name in names:
            _png(root / "JPEGImages" / f"{name}.jpg", rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
            mask = np.zeros((24, 40), np.uint8)
            mask[4:12, 8:20] = 15  # person
            mask[12, :] = 255  # void boundary
            _png(root / "SegmentationClass" / f"{name}.png", mask, palette=True)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def test_voc_and_ade20k_layouts_and_their_ignore_labels(tmp_path, encoder):
    _fake_voc(tmp_path / "VOCdevkit" / "VOC2012")
    voc = build_source(f"voc:{tmp_path}", "train")
    assert len(voc) == 2
    mask = voc[0]["mask"]
    assert set(mask.unique().tolist()) == {0, 15, 255}
    res = incontext_segmentation(encoder, f"voc:{tmp_path}", k=3, extract=QUIET, log=None)
    assert res["settings"]["ignore_index"] == 255 and res["data"]["num_classes"] == 21
    assert res["results"]["pixels"] == 32 * 32 - 32  # one void row (at 24 px) becomes 32 / 24 rows at 32 px

    ade = tmp_path / "ade"
    for sub in ("training", "validation"):
        _png(ade / "images" / sub / "x.jpg", np.zeros((16, 16, 3), np.uint8))
        _png(
            ade / "annotations" / sub / "x.png",
            np.array([[0, 1], [150, 7]], np.uint8).repeat(8, 0).repeat(8, 1),
        )
    sample = build_source(f"ade20k:{ade}", "val")[0]["mask"]
    assert sample[::8, ::8].tolist() == [[255, 0], [149, 6]]  # 0 ignored, 1..150 -> 0..149
    with pytest.raises(FileNotFoundError, match="no JPEGImages"):
        build_source(f"voc:{ade}", "train")


# ----------------------------------------------------------------------------- classification


def test_prototypes_and_knn_classify_separable_features_and_fail_on_shuffled_ones():
    x_train, y_train, x_test, y_test = separable(10, num_classes=5)
    out = incontext_episodes(x_train, y_train, x_test, y_test, shots=(1, 5), episodes=3, k=20)
    assert out[1]["prototype"]["mean"] == 100.0 and out[5]["knn"]["mean"] == 100.0
    assert out[1]["k"] == 5 and out[5]["k"] == 20  # k is capped at the support size (5 classes x n)
    shuffled = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))]
    assert prototype_top1(x_train, y_train, x_test, shuffled) < 50.0


def test_interval_is_the_normal_95_percent_interval():
    stats = interval([60.0, 70.0, 80.0])
    assert stats["mean"] == 70.0 and stats["std"] == pytest.approx(10.0)
    assert stats["ci95"] == pytest.approx(1.96 * 10.0 / 3**0.5)


# ----------------------------------------------------------------------------- tool and benchmark


def _tool():
    return importlib.import_module("mimkit.cli.incontext")


def test_tool_seg_vs_random_and_cls_write_their_json(encoder, tmp_path, capsys):
    export = save_backbone(encoder, tmp_path / "enc").parent
    tool = _tool()
    common = ["--encoder", str(export), "--train", DATA, "--workers", "0", "--no-progress"]
    out = tmp_path / "seg.json"
    tool.main(["seg", *common, "--k", "4", "--memory-size", "150", "--vs-random", "--json", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("memory bank:") and "pretrained  random init" in text
    res = json.loads(out.read_text())
    assert set(res) == {"pretrained", "random init"} and res["random init"]["encoder"]["random_init"] is True
    assert res["pretrained"]["settings"]["k"] == 4

    out = tmp_path / "cls.json"
    tool.main(["cls", *common, "--shots", "1", "--episodes", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    assert (
        set(res["results"]["1"]) == {"prototype", "knn", "k"}
        and len(res["results"]["1"]["knn"]["episodes"]) == 2
    )
    with pytest.raises(SystemExit):
        tool.main(["seg", *common, "--memory-size", "0"])


def test_benchmark_reports_queries_per_second_per_memory_size():
    rows = benchmark_incontext((100, 400), dim=8, num_classes=3, num_queries=64, k=5, repeats=1)
    assert [r["memory_size"] for r in rows] == [100, 400]
    assert all(r["queries_per_s"] > 0 and r["num_queries"] == 64 for r in rows)
