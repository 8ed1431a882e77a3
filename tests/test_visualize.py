"""Reconstruction pictures and metric curves."""

import json

import pytest
import torch
from PIL import Image

from mimkit.data import IMAGENET_MEAN, IMAGENET_STD
from mimkit.ssl import build_method
from mimkit.visualize import RECON_ROWS, plot_curves, read_metrics, reconstruct, save_recon_grid

MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def _mae(norm_pix):
    return build_method(
        {
            "name": "mae",
            "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 1},
            "decoder_dim": 32,
            "decoder_depth": 1,
            "decoder_heads": 2,
            "norm_pix_loss": norm_pix,
        }
    ).eval()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_rows_keep_visible_pixels_and_grey_out_masked_ones(norm_pix):
    images = (torch.rand(3, 3, 32, 32) - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    pictures = reconstruct(_mae(norm_pix), images, MEAN, STD, seed=1)
    assert list(pictures) == list(RECON_ROWS)
    original = pictures["original"]
    mask = _mae(norm_pix).mask_generator(3, (4, 4), generator=torch.Generator().manual_seed(1))
    pixel_mask = mask.view(3, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3).expand(-1, 3, -1, -1)
    pasted, masked = pictures["reconstruction + visible"], pictures["masked"]
    torch.testing.assert_close(pasted[~pixel_mask], original[~pixel_mask])
    torch.testing.assert_close(masked[~pixel_mask], original[~pixel_mask])
    grey = MEAN.view(1, 3, 1, 1).expand(3, -1, 32, 32)
    torch.testing.assert_close(masked[pixel_mask], grey[pixel_mask])
    torch.testing.assert_close(pasted[pixel_mask], pictures["reconstruction"][pixel_mask])


def test_recon_grid_png_has_one_row_per_kind(tmp_path):
    pictures = {k: torch.rand(5, 3, 32, 32) for k in RECON_ROWS}
    path = save_recon_grid(pictures, tmp_path / "r.png", scale=1)
    width, height = Image.open(path).size
    assert (width, height) == (2 + 5 * 34, 2 + 4 * 34)


def test_curves_skip_a_torn_last_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 1.0 / (s + 1), "lr": 1e-3 * s}) for s in range(1, 20)]
    metrics.write_text("\n".join(lines) + '\n{"step": 20, "lo')
    assert len(read_metrics(metrics)) == 19
    path = plot_curves(metrics, tmp_path / "curves.png")
    assert Image.open(path).size[0] > 400


def test_curves_of_an_empty_log_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no step records"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")


def _visualize_tool():
    """The visualize command's module (``tools/visualize.py`` is a thin wrapper over it)."""
    import importlib

    return importlib.import_module("mimkit.cli.visualize")


def test_mask_picture_has_a_row_per_kind_and_the_tool_draws_it(tmp_path):
    from mimkit.visualize import default_mask_kinds, plot_masks

    kinds = default_mask_kinds(0.5)
    assert list(kinds) == ["red", "green", "blue", "purple", "random", "block"]
    few = {k: kinds[k] for k in ("green", "random")}
    small = plot_masks(tmp_path / "few.png", few, grid_size=(6, 6), num=3, spectrum_samples=16)
    full = plot_masks(tmp_path / "all.png", kinds, grid_size=(6, 6), num=3, spectrum_samples=16)
    assert Image.open(full).size[1] > 2 * Image.open(small).size[1]  # one strip per kind
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="'teal'"):
        plot_masks(tmp_path / "bad.png", {"x": {"type": "colornoise", "color": "teal"}}, grid_size=(6, 6))

    tool = _visualize_tool()
    out = tmp_path / "tool.png"
    tool.main(["masks", "--type=colornoise", "--color=blue", "--grid=6", "--num=2", f"--out={out}"])
    assert Image.open(out).size[0] > 400
    assert list(tool.mask_kinds("colornoise", "blue", 0.75)) == ["colornoise blue", "random", "block"]
    with pytest.raises(SystemExit):
        tool.main(["curves"])  # recon and curves still need a run directory
