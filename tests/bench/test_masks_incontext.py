"""``benchmark.py masks`` and ``benchmark.py incontext`` (retrieval and ``--prompt``) at tiny sizes, through
their ``run``."""

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import incontext, masks
from mimkit.ssl.colornoise import COLORS
from mimkit.ssl.masking import list_masks, num_masked


def _args(module, argv: list[str]) -> argparse.Namespace:
    # what tools/benchmark.py builds: the module's options plus --json and --no-progress
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    parser.add_argument("--json")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args([*argv, "--no-progress"])


def test_masks_every_type_and_colour(capsys):
    res = masks.run(_args(masks, ["--batch", "8", "--grid", "6", "8", "--repeat", "2", "--ratio", "0.5"]))
    res = json.loads(json.dumps(res))  # JSON-ready
    names = [r["type"] for r in res["results"]]
    expected = [t for t in list_masks() if t != "colornoise"] + [f"colornoise:{c}" for c in COLORS]
    assert sorted(names) == sorted(expected) and "random" in names and "block" in names
    for r in res["results"]:
        assert r["batch"] == 8 and r["grid"] == [6, 8] and r["ratio"] == 0.5
        assert r["masked_per_sample"] == num_masked(48, 0.5)
        assert 0 < r["min_ms"] <= r["median_ms"] and r["setup_ms"] > 0
        assert r["masks_per_s"] == pytest.approx(8 / (r["median_ms"] / 1e3))
    assert res["options"]["batch"] == 8 and res["machine"]["torch_threads"] >= 1
    table = capsys.readouterr().out
    assert all(name in table for name in expected)


def test_masks_selected_types_and_errors():
    assert masks.mask_specs(["colornoise:green", "random", "random"]) == ["colornoise:green", "random"]
    assert masks.mask_config("colornoise:blue", 0.6) == {"type": "colornoise", "ratio": 0.6, "color": "blue"}
    res = masks.run(
        _args(masks, ["--types", "colornoise:red", "--batch", "4", "--grid", "4", "4", "--repeat", "1"])
    )
    assert [r["type"] for r in res["results"]] == ["colornoise:red"]
    with pytest.raises(ValueError, match=r"unknown mask type 'checker'; valid: .*random.*colornoise:green"):
        masks.run(_args(masks, ["--types", "random", "checker", "--batch", "4"]))
    with pytest.raises(ValueError, match="unknown color 'pink' in 'colornoise:pink'; valid: red, green"):
        masks.mask_specs(["colornoise:pink"])
    with pytest.raises(ValueError, match="takes no ':x' variant"):
        masks.mask_specs(["random:x"])
    with pytest.raises(ValueError, match="must be positive"):
        masks.run(_args(masks, ["--batch", "0"]))


def test_incontext_one_row_per_size():
    argv = ["--memory-sizes", "400", "100", "--dim", "8", "--queries", "64", "--k", "5", "--repeat", "1"]
    res = json.loads(json.dumps(incontext.run(_args(incontext, argv))))
    rows = res["results"]
    assert [r["memory_size"] for r in rows] == [100, 400]
    for r in rows:
        assert r["dim"] == 8 and r["num_queries"] == 64 and r["k"] == 5 and r["key_dtype"] == "fp32"
        assert r["device"] == "cpu" and r["queries_per_s"] > 0
        assert r["queries_per_s"] == pytest.approx(64 / r["seconds"])
    assert res["options"]["memory_sizes"] == [400, 100] and "machine" in res


def test_incontext_errors():
    with pytest.raises(ValueError, match="--k=50 exceeds the smallest memory size 20"):
        incontext.run(_args(incontext, ["--memory-sizes", "20", "100", "--k", "50"]))
    with pytest.raises(ValueError, match="--dim must be positive"):
        incontext.run(_args(incontext, ["--dim", "0"]))
    with pytest.raises(ValueError, match="valid: cpu, cuda"):
        incontext.run(_args(incontext, ["--device", "tpu7", "--memory-sizes", "100"]))


def _tiny_recipe(tmp_path, recipe: str) -> str:
    from mimkit.train import load_recipe
    from tests.helpers import REPO

    overrides = ["method.backbone.img_size=32", "method.backbone.depth=1", "method.decoder_dim=8"]
    overrides += ["method.merge_block=0"] if "painter" in recipe else ["method.decoder_depth=1"]
    path = tmp_path / Path(recipe).name
    path.write_text(load_recipe(REPO / recipe, overrides, check_data=False).dump())
    return str(path)


def test_incontext_prompt_paints_every_canvas_once_per_timed_run(tmp_path, monkeypatch, capsys):
    import mimkit.eval.prompting as prompting

    painted = []
    real_paint = prompting.paint

    def counting_paint(method, canvases, mask):
        assert mask.sum(1).eq(mask.shape[1] // 4).all()  # exactly the answer quadrant is hidden
        painted.append(len(canvases))
        return real_paint(method, canvases, mask)

    monkeypatch.setattr(prompting, "paint", counting_paint)
    recipes = [_tiny_recipe(tmp_path, r) for r in incontext.PROMPT_RECIPES]
    argv = ["--prompt", "--recipes", *recipes, "--canvases", "10", "--batch-size", "4", "--repeat", "2"]
    res = json.loads(json.dumps(incontext.run(_args(incontext, argv))))
    assert res["benchmark"] == "incontext --prompt" and res["options"]["canvases"] == 10
    assert [r["method"] for r in res["results"]] == ["painter", "mae"]
    # per recipe: one canvas batch to build the timed canvases and a warm-up batch for the tool's path
    # and the bare forward each; then two rounds, each timing a pass over 4 + 4 + 2 canvases of every
    # recipe's two paths in turn
    assert painted == [4, 4, 4] * 2 + [4, 4, 2] * 4 * 2
    for r in res["results"]:
        assert r["side"] == 32 and r["grid"] == [4, 4] and r["batch_size"] == 4
        assert r["canvases_per_s"] == pytest.approx(10 / r["seconds"])
        assert r["ratio"] == pytest.approx(r["seconds"] / r["forward_seconds"])
    painter, mae = res["results"]
    assert mae["forward_cost_vs_mae_forward"] == mae["cost_vs_mae_path"] == pytest.approx(1.0)
    assert painter["forward_cost_vs_mae_forward"] == pytest.approx(
        painter["forward_seconds"] / mae["forward_seconds"]
    )
    assert painter["cost_vs_mae_path"] == pytest.approx(painter["seconds"] / mae["seconds"])
    assert painter["cost_vs_mae_forward"] == pytest.approx(painter["seconds"] / mae["forward_seconds"])
    assert "cost_vs_mae_path" in capsys.readouterr().out


def test_incontext_prompt_refuses_bad_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file nothing.yaml"):
        incontext.run(_args(incontext, ["--prompt", "--recipes", "nothing.yaml"]))
    with pytest.raises(ValueError, match="--canvases must be positive"):
        incontext.run(_args(incontext, ["--prompt", "--canvases", "0"]))
    with pytest.raises(ValueError, match=r"norm_pix_loss.*method\.norm_pix_loss=false"):
        incontext.run(
            _args(
                incontext, ["--prompt", "--recipes", _tiny_recipe(tmp_path, "recipes/demo/mae_vit_tiny.yaml")]
            )
        )
