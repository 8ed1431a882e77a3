"""Visual prompting: an oracle that copies the support label scores 100% on identical support and
query; norm-pix models are refused naming the recipe key; the result's JSON fields; the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mimkit.data.transforms import Normalization
from mimkit.eval.prompting import evaluate_prompting, prompt_segmentation
from mimkit.models import create_backbone
from mimkit.ssl import build_method
from mimkit.ssl import canvas as cv
from mimkit.train import load_recipe
from tests.helpers import REPO

SOURCE = "synthetic:textures?size=48&train=24&val=12&seed=0&segmentation=1"
TINY_OVERRIDES = (
    "method.backbone.img_size=32",
    "method.backbone.depth=1",
    "method.decoder_depth=1",
    "method.decoder_dim=32",
)
TINY_PAINTER = (
    "method.backbone.img_size=32",
    "method.backbone.depth=1",
    "method.merge_block=0",
    "method.decoder_dim=8",
)


class CopySupportLabel(nn.Module):
    """An oracle: paints the answer cell with the support's output cell."""

    def __init__(self):
        super().__init__()
        self.encoder = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=1).eval()
        self.separator = 1

    def paint(self, canvases, mask):
        out = canvases.clone()
        support = cv.crop_cell(canvases, "support_output", self.separator)
        cv.crop_cell(out, "answer", self.separator).copy_(support)
        return out


def _run_dir(tmp_path: Path, recipe: str, *overrides: str, weights: bool = True) -> Path:
    run = tmp_path / Path(recipe).stem
    run.mkdir()
    r = load_recipe(REPO / recipe, list(overrides), check_data=False)
    (run / "recipe.yaml").write_text(r.dump())
    if weights:
        torch.manual_seed(0)
        save_file(build_method(r.method.to_dict()).state_dict(), str(run / "model.safetensors"))
    return run


def test_oracle_copying_the_support_scores_100_on_identical_support_and_query():
    cell = cv.cell_size(32, 1)
    res = evaluate_prompting(
        CopySupportLabel(), Normalization(), SOURCE, pool_split="val", pool_size=None,
        selection="nearest", label_size=cell, progress=False,
    )  # fmt: skip
    assert res["results"]["fg"]["fg_iou"] == pytest.approx(100.0)
    assert res["results"]["fg"]["fg_iou_pooled"] == pytest.approx(100.0)
    assert res["results"]["semantic"]["miou"] == pytest.approx(100.0)
    assert res["results"]["semantic"]["pixel_acc"] == pytest.approx(100.0)
    assert list(res["results"]["fg"]["fg_iou_by_class"].values()) == pytest.approx([100.0] * 3)
    # with other images as supports the copy is wrong
    other = evaluate_prompting(CopySupportLabel(), Normalization(), SOURCE, label_size=cell, progress=False)
    assert other["results"]["semantic"]["miou"] < 90.0


def test_per_class_foreground_iou_weighs_back_to_the_mean():
    cell = cv.cell_size(32, 1)
    res = evaluate_prompting(
        CopySupportLabel(), Normalization(), SOURCE, label_size=cell, seeds=(0, 1), progress=False
    )
    fg = res["results"]["fg"]
    names = ("fine", "medium", "coarse")
    for run in fg["per_seed"]:
        by_class, counts = run["fg_iou_by_class"], run["episodes_by_class"]
        assert set(by_class) == set(counts) and set(by_class) <= set(names)
        assert sum(counts.values()) == res["data"]["num_queries"]
        weighted = sum(by_class[c] * counts[c] for c in by_class) / sum(counts.values())
        assert weighted == pytest.approx(run["fg_iou"])
    # the seeds' mean, class by class
    for name, value in fg["fg_iou_by_class"].items():
        seen = [r["fg_iou_by_class"][name] for r in fg["per_seed"] if name in r["fg_iou_by_class"]]
        assert value == pytest.approx(sum(seen) / len(seen))
    assert min(fg["fg_iou_by_class"].values()) < 100.0  # other supports: the copy is wrong somewhere


def test_norm_pix_model_is_refused_naming_the_recipe_key(tmp_path):
    run = _run_dir(tmp_path, "recipes/demo/mae_vit_tiny.yaml", weights=False)  # no weights: refused first
    with pytest.raises(ValueError, match=r"method\.norm_pix_loss=false"):
        prompt_segmentation(run, SOURCE, progress=False)


def test_result_fields_and_random_init(tmp_path):
    run = _run_dir(tmp_path, "recipes/demo/mae_rawpix_vit_tiny.yaml", *TINY_OVERRIDES)
    res = prompt_segmentation(run, SOURCE, shots=2, seeds=(0, 1), num_queries=6, progress=False)
    assert res["tool"] == "prompt" and res["settings"]["method"] == "mae"
    assert res["settings"]["canvas"] == {"side": 32, "cell": 15, "separator": 2, "layout": list(cv.QUADRANTS)}
    assert res["data"]["num_queries"] == 6 and res["data"]["num_classes"] == 4
    fg, sem = res["results"]["fg"], res["results"]["semantic"]
    assert {
        "fg_iou",
        "fg_iou_std",
        "fg_iou_pooled",
        "binary_miou",
        "fg_iou_all_foreground",
        "fg_iou_by_class",
        "episodes_by_class",
        "per_seed",
    } <= fg.keys()
    assert {"miou", "pixel_acc", "per_seed"} <= sem.keys() and len(sem["per_seed"]) == 2
    assert 0.0 <= fg["fg_iou"] <= 100.0
    floor = prompt_segmentation(run, SOURCE, random_init=True, num_queries=6, progress=False)
    assert floor["encoder"]["random_init"] is True


def test_cli_end_to_end_on_tiny_data(tmp_path, capsys):
    from mimkit.cli.main import main

    run = _run_dir(tmp_path, "recipes/demo/painter_vit_tiny.yaml", *TINY_PAINTER)
    out_json, out_png = tmp_path / "prompt.json", tmp_path / "prompt.png"
    code = main(
        ["prompt", "--run", str(run), "--train", SOURCE, "--vs-random", "--shots", "2",
         "--selection", "nearest", "--num-queries", "8", "--json", str(out_json), "--png", str(out_png),
         "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "random init" in printed and "fg fg_iou" in printed
    res = json.loads(out_json.read_text())
    assert res["settings"]["method"] == "painter" and "random_init" in res
    assert res["examples_png"] == str(out_png) and out_png.stat().st_size > 0


def test_cli_refuses_norm_pix_run(tmp_path, capsys):
    from mimkit.cli.prompt import main

    run = _run_dir(tmp_path, "recipes/demo/mae_vit_tiny.yaml", weights=False)
    with pytest.raises(SystemExit):
        main(["--run", str(run), "--train", SOURCE])
    assert "method.norm_pix_loss=false" in capsys.readouterr().err


def test_incontext_prompt_subcommand_is_the_prompting_tool(tmp_path, capsys):
    from mimkit.cli.incontext import main

    run = _run_dir(tmp_path, "recipes/demo/mae_rawpix_vit_tiny.yaml", *TINY_OVERRIDES)
    out_json = tmp_path / "prompt.json"
    argv = ["prompt", "--run", str(run), "--train", SOURCE, "--task", "fg", "--num-queries", "4",
            "--json", str(out_json), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv, prog="incontext") == 0
    res = json.loads(out_json.read_text())
    assert res["tool"] == "prompt" and list(res["results"]) == ["fg"] and res["data"]["num_queries"] == 4
    norm_pix = _run_dir(tmp_path, "recipes/demo/mae_vit_tiny.yaml", weights=False)
    with pytest.raises(SystemExit):
        main(["prompt", "--run", str(norm_pix), "--train", SOURCE], prog="incontext")
    err = capsys.readouterr().err
    assert "incontext prompt: error" in err and "method.norm_pix_loss=false" in err
    with pytest.raises(SystemExit):
        main(["--help"], prog="incontext")
    assert "{seg,cls,prompt}" in capsys.readouterr().out


def test_a_converted_official_mae_with_its_decoder_paints(tmp_path):
    from mimkit.interop import convert_checkpoint
    from tests.interop import HEADS, official_mae

    ckpt = tmp_path / "mae_visualize.pth"
    torch.save({"model": official_mae()}, ckpt)
    options = dict(keep_decoder=True, num_heads=HEADS, decoder_heads=2)
    convert_checkpoint(ckpt, tmp_path / "plain", "mae", norm_pix_loss=False, **options)
    res = prompt_segmentation(tmp_path / "plain", SOURCE, tasks=("fg",), num_queries=4, progress=False)
    assert res["settings"]["method"] == "mae" and res["settings"]["canvas"]["side"] == 32
    assert 0.0 <= res["results"]["fg"]["fg_iou"] <= 100.0
    convert_checkpoint(ckpt, tmp_path / "normpix", "mae", norm_pix_loss=True, **options)
    with pytest.raises(ValueError, match=r"method\.norm_pix_loss=false"):
        prompt_segmentation(tmp_path / "normpix", SOURCE, progress=False)
