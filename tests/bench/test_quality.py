"""``benchmark.py quality``: the batched crop, the argument checks, and tiny runs of the whole tool.

The tiny runs train a 2-block, 32-wide ViT at 32 px for 3 steps of 16 images, in a separate process
through ``tools/benchmark.py`` (the trainer brings up a process group that outlives the run).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from benchmarks import quality
from mimkit.data import SOURCE_SCHEMES, register_scheme
from tests.helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "benchmark.py"
SOURCE = "synthetic:shapes?size=32&train=64&val=48&cache=1&segmentation=0"
TINY = f"""\
defaults: {REPO / "recipes" / "demo" / "mae_vit_tiny.yaml"}
method:
  backbone: {{name: vit_tiny_patch16, img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}}
  decoder_dim: 16
  decoder_depth: 1
  decoder_heads: 2
data: {{source: "{SOURCE}", workers: 0}}
batch: {{global_size: 16, micro_size: 8}}
train: {{epochs: 2}}
optim: {{lr: 1.0e-2, warmup_epochs: 0}}
run: {{log_every: 2}}
"""


# ----------------------------------------------------------------------------- the batched crop


def test_a_whole_image_box_returns_the_image_resized():
    g = torch.Generator().manual_seed(0)
    square = torch.rand(2, 1, 16, 16, generator=g)
    whole = torch.tensor([[0, 0, 16, 16]] * 2)
    assert torch.allclose(quality.crop_resize(square, whole, 16), square, atol=1e-5)
    flipped = quality.crop_resize(square, whole, 16, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], square[0].flip(-1), atol=1e-5)
    assert torch.allclose(flipped[1], square[1], atol=1e-5)

    wide = torch.rand(2, 3, 12, 20, generator=g)
    out = quality.crop_resize(wide, torch.tensor([[0, 0, 12, 20]] * 2), 24)
    expected = F.interpolate(wide, size=(24, 24), mode="bicubic", align_corners=False)
    assert out.shape == (2, 3, 24, 24)
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_box_at_its_own_size_is_the_plain_crop():
    image = torch.arange(2 * 20 * 24, dtype=torch.float32).view(1, 2, 20, 24)
    box = torch.tensor([[4, 2, 8, 8]])  # top, left, h, w
    assert torch.allclose(quality.crop_resize(image, box, 8), image[..., 4:12, 2:10], atol=1e-3)


@pytest.mark.parametrize(
    ("height", "width", "scale"), [(64, 64, (0.2, 1.0)), (48, 80, (0.2, 1.0)), (32, 32, (0.3, 0.5))]
)
def test_crop_boxes_lie_inside_and_follow_torchvisions_rule(height, width, scale):
    n = 4000
    boxes = quality.sample_crop_boxes(n, height, width, scale, generator=torch.Generator().manual_seed(1))
    again = quality.sample_crop_boxes(n, height, width, scale, generator=torch.Generator().manual_seed(1))
    assert torch.equal(boxes, again)
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all())
    assert bool((top + h <= height).all() and (left + w <= width).all())
    area = (h * w).double() / (height * width)
    aspect = w.double() / h.double()
    if width / height > 4 / 3:  # torchvision's fallback: the whole image cut to the ratio range
        fallback_box = (height, round(height * 4 / 3))
    elif width / height < 3 / 4:
        fallback_box = (round(width * 4 / 3), width)
    else:
        fallback_box = (height, width)
    drawn = ~((h == fallback_box[0]) & (w == fallback_box[1]))
    assert float(drawn.double().mean()) > 0.8
    rounding = (height + width) / (2 * height * width)  # each side is rounded to whole pixels
    assert bool((area[drawn] >= scale[0] - rounding).all() and (area[drawn] <= scale[1] + rounding).all())
    assert bool((aspect[drawn] >= 3 / 4 - 0.1).all() and (aspect[drawn] <= 4 / 3 + 0.1).all())
    assert len(set(map(tuple, boxes.tolist()))) > n // 4  # positions and sizes vary

    torch.manual_seed(2)  # torchvision's own draws: the same distribution of areas and aspects
    reference = [
        v2.RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3])
        for _ in range(n)
    ]
    ref_area = torch.tensor([bh * bw / (height * width) for _, _, bh, bw in reference], dtype=torch.float64)
    ref_aspect = torch.tensor([bw / bh for _, _, bh, bw in reference], dtype=torch.float64)
    assert abs(float(area.mean() - ref_area.mean())) < 0.02
    assert abs(float(aspect.log().mean() - ref_aspect.log().mean())) < 0.02


def test_batched_augment_normalises_with_the_given_statistics():
    images = torch.full((3, 1, 20, 20), 128, dtype=torch.uint8)
    mean, std = torch.tensor([0.3]), torch.tensor([0.2])
    out = quality.batched_augment(images, 16, (0.2, 1.0), mean, std, torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 16, 16)
    assert torch.allclose(out, torch.full_like(out, (128 / 255 - 0.3) / 0.2), atol=1e-5)


def test_token_decay_moves_the_tokens_into_the_decayed_group():
    from mimkit.ssl import build_method

    method = build_method(
        {
            "name": "mae",
            "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 1},
            "decoder_dim": 16,
            "decoder_depth": 1,
            "decoder_heads": 2,
        }
    )
    by_id = {id(p): n for n, p in method.named_parameters()}

    def decayed(no_decay):
        groups = quality.plain_param_groups(method, 0.05, no_decay)
        return {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    mimkit_groups = decayed(["pos_embed", "_token"])
    official = decayed(["pos_embed"])
    assert "encoder.cls_token" not in mimkit_groups and "decoder.mask_token" not in mimkit_groups
    assert official - mimkit_groups == {"encoder.cls_token", "decoder.mask_token"}
    assert all("bias" not in n and "norm" not in n for n in official)


def test_final_window_matches_the_trainers_last_log_line():
    assert quality.final_window(150, 10) == 10
    assert quality.final_window(155, 10) == 5
    assert quality.final_window(3, 2) == 1


# ----------------------------------------------------------------------------- argument checks


if "quality-nolabels" not in SOURCE_SCHEMES:

    @register_scheme("quality-nolabels")
    def _unlabelled(spec, split, transform):
        class Unlabelled(torch.utils.data.Dataset):
            def __len__(self):
                return 32

            def __getitem__(self, index):
                return {"image": torch.zeros(3, 32, 32)}

        return Unlabelled()


def _args(recipe: Path, overrides: list[str], options: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quality.add_args(parser)
    parser.add_argument("--json")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args([str(recipe), *overrides, "--steps", "3", *options, "--no-progress"])


@pytest.mark.parametrize(
    ("overrides", "options", "message"),
    [
        ([], ["--steps", "0"], "--steps=0 must be a positive"),
        ([], ["--steps", "9"], r"--steps=9 exceeds the recipe's whole schedule \(train.epochs=2 x 4 steps"),
        ([], ["--seeds", "1", "1"], r"--seeds \[1, 1\] must be distinct"),
        ([], ["--eval-images", "5"], "--eval-images=5 must be at least k=20"),
        (["data.source=synthetic:shapes?size=32&train=8&val=8"], [], "holds 8 images, fewer than one batch"),
        ([], ["--eval-train", "quality-nolabels:x"], "'quality-nolabels:x' .*yields no labels"),
        ([], ["--eval-val", "synthetic:shapes?size=32&train=64&val=0"], "val=0 must be at least 1"),
        (["optim.lrr=1"], [], "recipe: unknown key optim.lrr"),
    ],
)
def test_a_bad_argument_fails_before_any_training(tmp_path, monkeypatch, overrides, options, message):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    calls = []
    for name in ("decode_split", "train_plain", "train_trainer_path", "initial_method"):
        monkeypatch.setattr(quality, name, lambda *a, _name=name, **k: calls.append(_name))
    with pytest.raises(ValueError, match=message):
        quality.run(_args(recipe, overrides, options))  # a --steps in options replaces the 3
    assert calls == []


# ----------------------------------------------------------------------------- the whole tool


def _finite_everywhere(tree, where="result"):
    if isinstance(tree, dict):
        for key, value in tree.items():
            _finite_everywhere(value, f"{where}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            _finite_everywhere(value, f"{where}[{i}]")
    else:
        assert tree is not None, f"{where} is None"
        if isinstance(tree, float):
            assert math.isfinite(tree), f"{where} = {tree}"


def _tool(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(TOOL), "quality", str(recipe), "--steps", "3", "--seeds", "0"]
    cmd += ["--eval-images", "40", "--json", str(out), "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.splitlines()[-1]) == res  # the JSON line
    return res, proc.stdout


def test_quality_tool_tiny_run(tmp_path):
    res, stdout = _tool(tmp_path)
    for name in ("random init", "plain loop", "trainer path", "trainer minus plain", "plain minus random"):
        assert name in stdout
    _finite_everywhere({k: v for k, v in res.items() if k != "recipe_resolved"})  # recipes hold nulls
    assert res["benchmark"] == "quality" and res["steps"] == 3 and res["seeds"] == [0]
    assert res["options"]["plain_augment"] == "batched" and res["options"]["plain_token_decay"] is False
    assert res["recipe_resolved"]["data"]["source"] == SOURCE and res["channels"] == 3
    assert res["train_data"] == {
        "source": SOURCE,
        "split": "train",
        "images": 64,
        "global_batch": 16,
        "micro_batch": 8,
        "steps_per_epoch": 4,
        "schedule_steps": 8,
        "img_size": 32,
    }
    assert res["eval"]["train"] == res["eval"]["val"] == SOURCE
    assert res["eval"]["num_train"] == 40 and res["eval"]["num_val"] == 40 and res["eval"]["num_classes"] >= 2
    assert res["machine"]["cpu_count"] >= 1 and "torch" in res["machine"]

    seed = res["per_seed"]["0"]
    rows = ("random_init", "plain_loop", "trainer_path")
    for row in rows:
        for metric in quality.METRICS:
            assert metric in seed[row], (row, metric)
        for metric in ("knn_cls", "knn_mean", "linear_cls", "linear_mean"):
            assert 0 <= seed[row][metric] <= 100
        assert res["means"][row]["knn_cls"]["per_seed"] == [seed[row]["knn_cls"]]
    for row in ("plain_loop", "trainer_path"):
        assert seed[row]["final_loss"] == seed[row]["loss"] and seed[row]["wall_s"] > 0
        assert [s for s, _ in seed[row]["loss_curve"]] == [2, 3]
    assert seed["random_init"]["loss"] == seed["plain_loop"]["first_loss"]
    # three different encoders: trained weights moved away from the init, and the two paths differ
    assert len({seed[row]["sha256"] for row in rows}) == 3
    moved = seed["weight_distance"]
    assert (
        moved["plain_loop_vs_random_init"]["l2"] > 1e-3 and moved["trainer_path_vs_random_init"]["l2"] > 1e-3
    )
    assert moved["trainer_path_vs_plain_loop"]["l2"] > 1e-3  # batched crops differ from the trainer's
    for gap, (a, b) in {"trainer_minus_plain": ("trainer_path", "plain_loop"),
                        "plain_minus_random": ("plain_loop", "random_init")}.items():  # fmt: skip
        for metric in quality.METRICS:
            assert res["gaps"][gap][metric]["per_seed"] == pytest.approx([seed[a][metric] - seed[b][metric]])
            assert res["gaps"][gap][metric]["half_range"] == 0 and res["gaps"][gap][metric]["std"] == 0


def test_with_the_trainers_augmentation_the_plain_loop_is_the_trainer_path(tmp_path):
    # same order, crops, masks, initial weights, groups and lr: DeepSpeed must change nothing but rounding
    res, _ = _tool(tmp_path, "--plain-augment", "trainer")
    seed = res["per_seed"]["0"]
    plain, trainer = seed["plain_loop"]["loss_curve"], seed["trainer_path"]["loss_curve"]
    assert [s for s, _ in plain] == [s for s, _ in trainer] == [2, 3]
    assert [loss for _, loss in plain] == pytest.approx([loss for _, loss in trainer], rel=1e-5)
    moved = seed["weight_distance"]["plain_loop_vs_random_init"]["l2"]
    assert moved > 1e-2
    assert seed["weight_distance"]["trainer_path_vs_plain_loop"]["l2"] < 1e-4 * moved
