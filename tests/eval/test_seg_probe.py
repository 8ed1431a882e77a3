"""The linear segmentation probe (DINOv2's protocol) on tiny encoders and tiny data."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.data.sample import make_sample
from mimkit.data.transforms import Normalization
from mimkit.eval import ExtractSettings
from mimkit.eval.seg_augment import ClassBalancedCrop, seg_probe_transform
from mimkit.eval.seg_data import patch_class_fractions, seg_source
from mimkit.eval.seg_head import SegLinearHead, SegProbe, count_predictions, pixel_cross_entropy, poly_lr
from mimkit.eval.seg_probe import dense_tokens, sample_order, seg_probe
from mimkit.eval.segmetrics import ConfusionMatrix
from mimkit.models import create_backbone, save_backbone
from tests.eval import single_thread as _single_thread

single_thread = pytest.fixture(autouse=True)(_single_thread)

REPO = Path(__file__).resolve().parents[2]
TEXTURES = "synthetic:textures?size=48&train=128&val=32"
TINY = "synthetic:textures?size=48&train=16&val=8"
QUIET = ExtractSettings(batch_size=32, progress=False)
RESULT_KEYS = {"tool", "protocol", "encoder", "data", "settings", "results", "mode", "note"}
RESULT_KEYS |= {"mimkit_version", "created"}
SETTINGS_KEYS = {
    "head", "n_last_blocks", "iterations", "batch_size", "warmup_iters", "warmup_ratio", "lr",
    "weight_decay", "betas", "power", "seed", "mode", "input_size", "patch_size", "grid", "feature",
    "feature_dim", "head_description", "optimizer", "schedule", "loss", "train_transform",
    "val_transform", "upsampling", "ignore_index", "normalisation", "precision", "extract",
}  # fmt: skip
RESULTS_KEYS = {
    "miou", "miou_hungarian", "pixel_accuracy", "classes_scored", "per_class_iou", "pixels",
    "train_loss_final", "train_loss_curve", "head_parameters", "seconds_features", "seconds_train",
    "seconds_eval",
}  # fmt: skip


def _tiny_vit(seed: int, img_size: int = 48):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(
            "vit_tiny_patch16", img_size=img_size, patch_size=8, depth=2, embed_dim=32, num_heads=2
        )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def random_vit():
    return _tiny_vit(7)


@pytest.fixture(scope="module")
def trained_vit():
    """A tiny ViT trained for a few seconds to tell texture coarseness patch by patch.

    Its blocks learn (through a throw-away linear readout) features from which a linear map reads
    each patch's class; a random init of the same shape has only what random projections of the
    pixels keep, which on synthetic:textures (coarseness is a second-order property of the pixels)
    is little.
    """
    data, names, _ = seg_source(TEXTURES, "train", "val", 48)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    masks = torch.stack([data[i]["mask"] for i in range(len(data))])
    target = patch_class_fractions(masks, 8, len(names))[0].argmax(-1)
    model = _tiny_vit(0).train().requires_grad_(True)
    readout = torch.nn.Linear(model.embed_dim, len(names))
    opt = torch.optim.AdamW([*model.parameters(), *readout.parameters()], lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        for _ in range(120):
            idx = torch.randint(len(images), (32,), generator=gen)
            tokens = model.forward_features(images[idx])[:, model.num_prefix_tokens :]
            loss = F.cross_entropy(readout(tokens).flatten(0, 1), target[idx].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- head, loss, schedule


def test_head_lays_row_major_tokens_on_the_patch_grid():
    # A 2 x 3 grid (not square, so a transposed layout cannot pass) and 3 classes; token i is the
    # one-hot of class i % 3, and the head is the identity.
    head = SegLinearHead(3, 3, batchnorm=False)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(3))
        head.linear.bias.zero_()
    tokens = F.one_hot(torch.arange(6) % 3, 3).float()[None]
    logits = head(tokens, (2, 3))
    assert logits.shape == (1, 3, 2, 3)
    assert logits[0].argmax(0).tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="6 tokens do not fill a 2 x 2 patch grid"):
        head(tokens, (2, 2))


def test_metrics_match_a_hand_computation():
    # Logits on a 2 x 2 grid predict [[0, 1], [1, 2]]; upsampled to 4 x 4 each cell covers its
    # 2 x 2 block (bilinear weights 3/4 : 1/4 never flip a +-1 margin).
    pred_grid = torch.tensor([[0, 1], [1, 2]])
    logits = (2 * F.one_hot(pred_grid, 3).permute(2, 0, 1).float() - 1)[None]
    gt = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 255, 1, 0],
            [1, 1, 0, 0],
            [255, 1, 0, 0],
        ]
    )
    conf = ConfusionMatrix(3, 255)
    count_predictions(conf, logits, gt[None])
    assert conf.conf.sum() == 14  # the two ignored pixels are not counted
    # Predicted map: [[0 0 1 1], [0 0 1 1], [1 1 2 2], [1 1 2 2]]. Over the 14 counted pixels:
    # class 0: 8 in the ground truth, predicted at 3 (the top-left block less its ignored pixel),
    #   all 3 right -> IoU 3 / (8 + 3 - 3);
    # class 1: 6 in the ground truth, predicted at 7 (4 top-right + 3 bottom-left), 6 right
    #   -> IoU 6 / (6 + 7 - 6);
    # class 2: absent from the ground truth, predicted at 4 -> IoU 0 (not NaN: it was predicted).
    iou = [3 / 8, 6 / 7, 0.0]
    summary = conf.summary(["a", "b", "c"])
    assert list(summary["per_class_iou"].values()) == pytest.approx(iou)
    assert summary["miou"] == pytest.approx(sum(iou) / 3)
    assert summary["pixel_accuracy"] == pytest.approx((3 + 6) / 14)


def test_ignored_pixels_add_nothing_to_the_loss_or_the_metrics():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=gen)
    masks = torch.randint(0, 4, (2, 12, 12), generator=gen)
    masks[0, :5] = 255
    masks[1, :, 7:] = 255
    up = F.interpolate(logits, size=(12, 12), mode="bilinear", align_corners=False)
    logp = up.log_softmax(1).permute(0, 2, 3, 1)  # (B, H, W, C)
    keep = masks != 255
    by_hand = -logp[keep].gather(1, masks[keep][:, None]).sum() / masks.numel()
    # The sum runs over the labelled pixels, the mean over all of them (mmseg's avg_non_ignore=False).
    assert float(pixel_cross_entropy(logits, masks)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(pixel_cross_entropy(logits, torch.full_like(masks, 255))) == 0.0  # not NaN
    # Metrics: logits at the label resolution (no upsampling), changed only on ignored pixels,
    # give the same confusion matrix, which counts the labelled pixels only.
    full = torch.randn(2, 4, 12, 12, generator=gen)
    changed = torch.where(keep[:, None], full, torch.randn(full.shape, generator=gen))
    a, b = ConfusionMatrix(4, 255), ConfusionMatrix(4, 255)
    count_predictions(a, full, masks)
    count_predictions(b, changed, masks)
    assert torch.equal(a.conf, b.conf) and int(a.conf.sum()) == int(keep.sum())
    assert not torch.equal(full.argmax(1), changed.argmax(1))


def test_poly_schedule_with_linear_warmup_is_mmcvs():
    s = SegProbe(iterations=100, warmup_iters=10, lr=1e-3)
    assert poly_lr(0, s) == pytest.approx(1e-3 * 1e-6)
    assert poly_lr(5, s) == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(10, s) == pytest.approx(1e-3 * 0.9)  # warm-up over: the poly value itself
    assert poly_lr(99, s) == pytest.approx(1e-5)
    assert SegProbe().warmup == 1500 and SegProbe().iterations == 40_000  # DINOv2's
    assert SegProbe(iterations=2000).warmup == 75  # the same fraction of a shorter run


def test_sample_order_sees_every_image_equally_often():
    order = sample_order(5, iterations=7, batch_size=3, seed=0)
    assert len(order) == 21
    counts = torch.bincount(order, minlength=5)
    assert counts.max() - counts.min() <= 1
    assert len(sample_order(2, 1, 4, 0)) == 4  # a batch may exceed the split


# ----------------------------------------------------------------------------- features and augmentation


def test_dense_tokens_are_the_final_normed_patch_tokens_of_the_last_blocks(random_vit):
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    last = dense_tokens(random_vit, images, 1)
    assert last.shape == (2, 36, 32)
    torch.testing.assert_close(last, random_vit.forward_features(images)[:, 1:])  # the in-context tool's
    x = random_vit.with_prefix(random_vit.patch_tokens(images))
    _, taps = random_vit.run_blocks(x, taps=(0, 1))
    both = dense_tokens(random_vit, images, 2)
    assert both.shape == (2, 36, 64)
    torch.testing.assert_close(both[..., :32], random_vit.norm(taps[0])[:, 1:])  # oldest block first
    torch.testing.assert_close(both[..., 32:], last)


def test_augmentation_keeps_image_and_mask_aligned_and_pads_with_the_ignore_label():
    # Four 24 x 24 quadrants of classes 0..3 whose grey level encodes the class: after any rescale,
    # crop, flip and pad, a pixel's grey level must still name its mask's class.
    mask = torch.zeros(48, 48, dtype=torch.uint8)
    mask[:24, 24:], mask[24:, :24], mask[24:, 24:] = 1, 2, 3
    image = (mask * 60).expand(3, -1, -1).clone()
    transform = seg_probe_transform(32, Normalization((0.0,) * 3, (1.0,) * 3))
    padded_seen = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(30):
            out = make_sample(image, mask=mask, transform=transform)
            img, m = out["image"][0], out["mask"]
            assert img.shape == m.shape == (32, 32)
            pad = m == 255
            padded_seen += bool(pad.any())
            assert bool((img[pad] == 0).all())
            level = (img[~pad] * 255 / 60).round().long()
            assert float((level == m[~pad]).float().mean()) > 0.9  # boundaries blur bilinearly
    assert padded_seen > 3  # rescales below 1x leave the crop short of 32 px


def test_class_balanced_crop_accepts_only_crops_no_class_dominates():
    crop = ClassBalancedCrop(8)  # cat_max_ratio 0.75: the largest class must stay under 75%
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[:4, :4] = 1  # class 1 only in the top-left corner
    assert not crop._balanced(mask, (0, 0, 8, 8))  # background 48 of 64 pixels: exactly 75%
    mask[4, :4] = 1
    assert crop._balanced(mask, (0, 0, 8, 8))  # 44 of 64
    assert not crop._balanced(mask, (8, 8, 8, 8))  # one class only
    mask[:8, :8] = 255
    mask[0, 0] = 1
    assert not crop._balanced(mask, (0, 0, 8, 8))  # of the labelled pixels, one class only


# ----------------------------------------------------------------------------- the probe


def test_a_trained_encoder_beats_its_random_init(trained_vit, random_vit):
    settings = SegProbe(iterations=150, seed=0)
    kw = dict(settings=settings, cached=True, extract=QUIET, log=None)
    trained = seg_probe(trained_vit, TEXTURES, **kw)["results"]
    rand = seg_probe(random_vit, TEXTURES, **kw)["results"]
    # Measured 0.41 vs 0.17 mIoU (4 classes); the margin leaves room for seeds and platforms.
    assert trained["miou"] > rand["miou"] + 0.1
    assert trained["pixel_accuracy"] > rand["pixel_accuracy"]
    # Both heads trained (the gap is not one head failing to start).
    for r in (trained, rand):
        assert r["train_loss_curve"][-1][1] < r["train_loss_curve"][0][1]


def test_the_augmented_protocol_runs_and_prints_its_plan_first(random_vit):
    lines = []
    res = seg_probe(
        random_vit, TINY, settings=SegProbe(iterations=4, batch_size=4), extract=QUIET, log=lines.append
    )
    assert lines[0].startswith("seg probe: 4 iterations x 4 images") and "augmented" in lines[0]
    assert res["mode"] == "augmented" and res["settings"]["warmup_iters"] == 0
    assert len(res["results"]["train_loss_curve"]) == 4 and 0 <= res["results"]["miou"] <= 1


def _fake_voc(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, names in {"train": ["a", "b"], "val": ["c"]}.items():
        for name in names:
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
                root / "JPEGImages" / f"{name}.jpg"
            )
            mask = np.zeros((48, 48), np.uint8)
            mask[8:24, 8:40] = 15
            mask[30:36, :] = 255  # void
            Image.fromarray(mask).save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def test_void_pixels_of_voc_are_ignored_end_to_end(random_vit, tmp_path):
    _fake_voc(tmp_path)
    res = seg_probe(
        random_vit, f"voc:{tmp_path}", settings=SegProbe(iterations=3, batch_size=2), extract=QUIET, log=None
    )
    assert res["settings"]["ignore_index"] == 255 and res["data"]["num_classes"] == 21
    assert res["results"]["pixels"] == 48 * 48 - 6 * 48  # the void rows are not scored
    assert len(res["results"]["per_class_iou"]) == 21


# ----------------------------------------------------------------------------- errors before any forward pass


@pytest.fixture
def forwards(monkeypatch):
    """Counts dense_tokens calls: every bad input must fail while this is still 0."""
    module = importlib.import_module("mimkit.eval.seg_probe")
    calls = []
    real = module.dense_tokens

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "dense_tokens", counted)
    return calls


def _folder(tmp_path: Path) -> str:
    for i in range(3):
        Image.new("RGB", (48, 48), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    return f"folder:{tmp_path}"


def test_bad_inputs_fail_before_any_forward_pass(random_vit, tmp_path, forwards):
    def fails(match: str, source: str = TINY, encoder=random_vit, val: str | None = None, **kw):
        kw.setdefault("settings", SegProbe(iterations=2, batch_size=2))
        with pytest.raises(ValueError, match=match):
            seg_probe(encoder, source, val, extract=kw.pop("extract", QUIET), log=None, **kw)
        assert not forwards

    folder = _folder(tmp_path)
    fails(
        rf"source '{folder}' \(train split\) yields no segmentation masks; .* voc:PATH or ade20k:PATH", folder
    )
    fails(r"yields no segmentation masks \(segmentation=0 leaves them out\)", TINY + "&segmentation=0")
    fails("yields no segmentation masks", TINY, val=folder)  # the val source too, before training
    fails("have different classes", TINY, val="synthetic:shapes?size=48&train=4&val=4")
    fails(r"n_last_blocks=4 exceeds the encoder's depth 2; valid: 1..2", settings=SegProbe(n_last_blocks=4))
    fails("img_size=64 differs from the encoder's input size 48", extract=ExtractSettings(img_size=64))
    fails(
        "img_size=44 is not a multiple of the encoder's patch size 8.* 40 and 48",
        encoder=_tiny_vit(0, 44),
    )
    fails("does not apply to the segmentation probe", extract=ExtractSettings(cache_dir=tmp_path))
    for bad, match in (
        (dict(head="mlp"), "unknown segmentation head 'mlp'; valid: bn, linear"),
        (dict(iterations=0), "iterations=0 must be a positive integer"),
        (dict(batch_size=0), "batch_size=0 must be a positive integer"),
        (dict(iterations=10, warmup_iters=10), r"warmup_iters=10 must be in \[0, iterations=10\)"),
        (dict(lr=0.0), "lr=0.0 must be positive"),
    ):
        with pytest.raises(ValueError, match=match):
            SegProbe(**bad)


def test_a_token_cache_or_logits_too_large_for_memory_fail_before_any_forward_pass(
    random_vit, monkeypatch, forwards
):
    free = {"cpu": 10**9}
    monkeypatch.setattr(
        importlib.import_module("mimkit.eval.preflight"),
        "available_bytes",
        lambda d: free[torch.device(d).type],
    )
    settings = SegProbe(iterations=2, batch_size=2)
    seg_probe(random_vit, TINY, settings=settings, cached=True, extract=QUIET, log=None)  # 1 GB: fits
    forwards.clear()
    # One step's logits (with their gradient and softmax) take 216 KiB, the cache of 16 images x 36
    # tokens x 32 dims + masks 108 KiB; 90% of the free memory may be planned.
    free["cpu"] = 2**17
    with pytest.raises(ValueError, match="one step's upsampled logits needs .* pass a smaller --batch-size"):
        seg_probe(random_vit, TINY, settings=settings, extract=QUIET, log=None)
    free["cpu"] = 2**16
    with pytest.raises(ValueError, match="the cached train tokens needs .* train without --cached"):
        seg_probe(random_vit, TINY, settings=settings, cached=True, extract=QUIET, log=None)
    assert not forwards


# ----------------------------------------------------------------------------- the command


def _tool():
    return importlib.import_module("mimkit.cli.seg_probe")


@pytest.fixture(scope="module")
def export(tmp_path_factory, random_vit):
    return save_backbone(random_vit, tmp_path_factory.mktemp("export") / "tiny").parent


def test_the_json_records_every_field(export, tmp_path, capsys):
    out = tmp_path / "seg.json"
    args = ["--encoder", str(export), "--train", TINY, "--cached", "--iterations", "6", "--batch-size",
            "4", "--head", "linear", "--n-last-blocks", "2", "--workers", "0", "--no-progress",
            "--json", str(out)]  # fmt: skip
    assert _tool().main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("seg probe: 6 iterations x 4 images") and "mIoU % (identity)" in printed
    res = json.loads(out.read_text())
    assert set(res) == RESULT_KEYS and res["tool"] == "seg_probe"
    assert res["protocol"] == "dinov2-linear-segmentation" and res["mode"] == "cached"
    assert "not the published protocol" in res["note"]
    s = res["settings"]
    assert set(s) == SETTINGS_KEYS
    assert (s["head"], s["n_last_blocks"], s["feature_dim"], s["grid"]) == ("linear", 2, 64, [6, 6])
    assert (s["lr"], s["weight_decay"], s["betas"]) == (1e-3, 1e-4, [0.9, 0.999])
    r = res["results"]
    assert set(r) == RESULTS_KEYS
    assert set(r["per_class_iou"]) == {"background", "fine", "medium", "coarse"}
    assert r["head_parameters"] == 64 * 4 + 4 and r["pixels"] == 8 * 48 * 48
    d = res["data"]
    assert (d["num_train"], d["num_val"], d["num_classes"]) == (16, 8, 4)
    assert res["encoder"]["random_init"] is False and res["encoder"]["config"]["embed_dim"] == 32


def test_the_command_runs_end_to_end_beside_a_random_init(export, tmp_path):
    out = tmp_path / "vs.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "seg_probe.py"), "--encoder", str(export), "--train", TINY,
           "--iterations", "3", "--batch-size", "4", "--vs-random", "--workers", "0", "--no-progress",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert (
        proc.stdout.startswith("seg probe: 3 iterations")
        and "pretrained  random init  gain (points)" in proc.stdout
    )
    res = json.loads(out.read_text())
    assert set(res) == {"pretrained", "random init", "gain"}
    assert res["random init"]["encoder"]["random_init"] is True and res["pretrained"]["mode"] == "augmented"
    gain = res["pretrained"]["results"]["miou"] - res["random init"]["results"]["miou"]
    assert res["gain"]["miou"] == pytest.approx(gain) and f"{100 * gain:+.2f}" in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "batch_size=0 must be a positive integer"),
        (["--iterations", "0"], "iterations=0 must be a positive integer"),
        (["--head", "mlp"], "invalid choice: 'mlp'"),
        (["--n-last-blocks", "3"], "n_last_blocks=3 exceeds the encoder's depth 2; valid: 1..2"),
        (["--img-size", "44"], "img_size=44 is not a multiple of the encoder's patch size 8"),
        (["--vs-random", "--random-init"], "--vs-random already probes the random init"),
        (["--cache-dir", "/tmp/x"], "--cache-dir does not apply to seg-probe"),
    ],
)
def test_the_command_rejects_bad_arguments_before_any_forward_pass(export, extra, message, forwards, capsys):
    with pytest.raises(SystemExit) as exc:
        _tool().main(["--encoder", str(export), "--train", TINY, "--workers", "0", "--no-progress", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not forwards
