"""Step and peak benchmarks: the trainer path computes what the reference does; the tools report."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks import step as step_bench
from benchmarks.reference import ReferenceMAE, noise_for_mask, reference_name
from mimkit.train.distributed import init_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--backbone",
    "vit_tiny_patch16",
    "--img-size",
    "32",
    "--batch",
    "4",
    "--set",
    "method.backbone.patch_size=8",
    "method.decoder_dim=64",
    "method.decoder_depth=2",
    "method.decoder_heads=4",
]


def _tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    step_bench.add_args(parser)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args([*TINY, "--zero-stage", "0", "--no-progress", *extra])


def test_trainer_path_matches_the_reference_step_loss_and_gradients():
    args = _step_args()
    dist = init_distributed()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = step_bench.TrainerPath(step_bench.build_recipe("mae", args, "fp32"), dist, images)
    reference = ReferenceMAE.from_mae(path.module)
    mask = path.module.mask_generator(
        4, path.module.encoder.grid_size, generator=torch.Generator().manual_seed(2)
    )

    loss = path.engine({"image": images}, mask=mask)["loss"]
    path.engine.backward(loss)
    ref_loss, _, ref_mask = reference(images, noise_for_mask(mask))
    ref_loss.backward()

    assert torch.equal(ref_mask.bool(), mask)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    ref_params = dict(reference.named_parameters())
    compared = 0
    for name, param in path.module.named_parameters():
        if param.requires_grad:
            ref_grad = ref_params[reference_name(name)].grad
            torch.testing.assert_close(param.grad, ref_grad, rtol=0, atol=1e-5, msg=name)
            compared += 1
    assert compared == sum(p.requires_grad for p in reference.parameters())
    path.engine.step()  # a full trainer step still runs after the comparison


def test_flop_split_attributes_encoder_and_decoder():
    args = _step_args()
    images = torch.randn(4, 3, 32, 32)
    path = step_bench.TrainerPath(step_bench.build_recipe("mae", args, "fp32"), init_distributed(), images)
    flops = path.flops()
    assert flops["encoder"] > 0 and flops["decoder"] > 0
    assert flops["other"] < 0.05 * flops["total"]  # losses and targets are cheap next to the blocks
    assert flops["total"] == flops["encoder"] + flops["decoder"] + flops["other"]
    assert all(p.grad is None for p in path.module.parameters())
    fused = ReferenceMAE.from_mae(path.module, fused_attn=True)  # SDPA's FLOPs are counted like mimkit's
    reference = step_bench.ReferencePath(fused, images, "fp32").flops()
    # the reference's head predicts every patch, mimkit's the masked ones only: a little more decoder work
    assert reference["encoder"] == pytest.approx(flops["encoder"], rel=0.02)  # the counter places the
    assert reference["decoder"] > flops["decoder"]  # patch-embedding's backward differently at times
    assert reference["total"] > flops["total"]


STEP_FIELDS = {
    "path",
    "dtype",
    "images_per_s",
    "ratio_to_reference",
    "step_seconds",
    "gflops_per_step",
    "gflops_per_image",
    "encoder_gflops",
    "decoder_gflops",
    "other_gflops",
    "decoder_share",
    "achieved_gflop_per_s",
    "peak_gflop_per_s",
    "utilisation",
    "peak_memory_mib",
    "mask_ms",
}


def test_step_tool_emits_every_field_for_mae_and_cmae(tmp_path, capsys):
    out = tmp_path / "step.json"
    argv = ["step", "--method", "mae", "cmae", *TINY, "--zero-stage", "0", "--steps", "1", "--warmup", "0"]
    assert _tool().main([*argv, "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    rows = {r["path"]: r for r in result["results"]}
    assert set(rows) == {"reference MAE", "mimkit mae", "mimkit cmae"}
    for row in rows.values():
        assert set(row) >= STEP_FIELDS, STEP_FIELDS - set(row)
        assert row["images_per_s"] > 0 and row["utilisation"] > 0
    assert rows["reference MAE"]["ratio_to_reference"] == 1.0
    # two decoders and two encoder passes: about twice MAE's FLOPs per image
    ratio = rows["mimkit cmae"]["gflops_per_image"] / rows["mimkit mae"]["gflops_per_image"]
    assert 1.8 < ratio < 2.2
    assert result["peak_gflop_per_s"]["fp32"] > 0


def test_step_tool_names_an_unknown_method(capsys):
    assert _tool().main(["step", "--method", "maee", *TINY, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "maee" in err and "mae" in err.split("registered:")[1]


def test_peak_tool_measures_fp32_and_bf16_at_the_model_shapes(tmp_path):
    out = tmp_path / "peak.json"
    argv = ["peak", "--backbone", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8", "--batch", "2"]
    assert _tool().main([*argv, "--decoder-dim", "64", "--min-seconds", "0.01", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["peak_gflop_per_s"]) == {"fp32", "bf16"}
    rows = result["results"]
    assert len(rows) == 16  # 4 matmuls x (encoder, decoder) x 2 dtypes
    shapes = {r["matmul"]: (r["m"], r["k"], r["n"]) for r in rows}
    assert shapes["encoder qkv"] == (2 * (1 + 4), 192, 3 * 192)  # cls + 4 of 16 patches visible
    assert shapes["decoder fc2"] == (2 * (1 + 16), 4 * 64, 64)
    for dtype, peak in result["peak_gflop_per_s"].items():
        assert peak == max(r["gflop_per_s"] for r in rows if r["dtype"] == dtype) > 0


@pytest.mark.parametrize("method", ["mae", "cmae"])
def test_masked_only_prediction_head_changes_no_loss_or_gradient(method):
    """Training mode runs the head on masked patches only; eval mode on all: same loss and gradients."""
    from mimkit.ssl import build_method

    torch.manual_seed(0)
    model = build_method(
        {
            "name": method,
            "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8},
            "decoder_dim": 64,
            "decoder_depth": 1,
            "decoder_heads": 4,
        }
    )
    images = torch.randn(3, 3, 32, 32)
    mask = model.mask_generator(3, model.encoder.grid_size, generator=torch.Generator().manual_seed(0))
    if method == "cmae":
        mask = (
            mask,
            model.mask_generator(3, model.encoder.grid_size, generator=torch.Generator().manual_seed(1)),
        )

    def loss_and_grads(train: bool):
        model.train(train)
        model.zero_grad(set_to_none=True)
        out = model({"image": images}, mask=mask)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lean, lean_grads = loss_and_grads(True)
    full, full_grads = loss_and_grads(False)
    assert lean["pred"].shape == full["pred"].shape
    torch.testing.assert_close(lean["loss"], full["loss"], rtol=0, atol=1e-6)
    assert lean_grads.keys() == full_grads.keys() and lean_grads
    for name, grad in lean_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    hidden = lean["patch_mask"]
    torch.testing.assert_close(lean["pred"][hidden], full["pred"][hidden], rtol=0, atol=1e-6)
    assert (lean["pred"][~hidden] == 0).all()
