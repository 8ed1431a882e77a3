"""tools/convert.py end to end: official layouts in, mimkit and timm exports out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.interop import convert_checkpoint, load_timm_export
from mimkit.models import load_backbone
from mimkit.train import load_method
from tests.interop import HEADS, IMG, official_cae, official_mae, reference_vit

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("_tool_convert", REPO / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def test_convert_tool_runs_mae_to_mimkit_to_timm(tmp_path):
    sd = official_mae()
    ckpt = tmp_path / "mae_full.pth"
    torch.save({"model": sd, "epoch": 3}, ckpt)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(REPO / "tools" / "convert.py"),
        str(ckpt),
        str(tmp_path / "mk"),
        "--from",
        "mae",
    ]
    cmd += ["--num-heads", str(HEADS), "--json", str(tmp_path / "report.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "dropped keys" in run.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads((tmp_path / "mk" / "convert.json").read_text())
    assert "decoder_pred.weight" in report["dropped_keys"]

    encoder = load_backbone(tmp_path / "mk").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.forward_features(_images()), reference_vit(sd, _images()), atol=1e-5, rtol=1e-5
        )

    assert _tool().main([str(tmp_path / "mk"), str(tmp_path / "tm"), "--from", "mimkit"]) == 0
    model = load_timm_export(tmp_path / "tm")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(_images()), encoder.forward_features(_images()))


def test_convert_keeps_the_decoder_into_a_loadable_run(tmp_path):
    ckpt = tmp_path / "cae.pth"
    torch.save({"model": official_cae()}, ckpt)
    report = convert_checkpoint(
        ckpt, tmp_path / "out", "cae", keep_decoder=True, num_heads=HEADS, decoder_heads=2
    )
    assert report["full_model"]["name"] == "cae"
    method = load_method(tmp_path / "out")
    assert torch.equal(
        method.encoder.blocks[0].attn.qkv.weight, load_backbone(tmp_path / "out").blocks[0].attn.qkv.weight
    )


def test_convert_tool_refuses_an_unsafe_pickle_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Path("x")}, path)
    assert _tool().main([str(path), str(tmp_path / "o"), "--from", "timm"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "o" / "encoder.safetensors").exists()


def test_unknown_source_and_misplaced_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'beit'; valid: mae, cae, timm, mimkit"):
        convert_checkpoint(tmp_path / "x.pth", tmp_path / "o", "beit")
    with pytest.raises(ValueError, match="keep_decoder applies to mae and cae"):
        convert_checkpoint(tmp_path / "x.pth", tmp_path / "o", "timm", keep_decoder=True)
