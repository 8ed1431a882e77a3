"""ExtractSettings: defaults, validation, the tools' arguments, and what the protocols pass on."""

import argparse
import dataclasses
import json

import pytest
import torch

from mimkit.eval import ExtractSettings, knn_eval
from mimkit.eval import knn as knn_module
from mimkit.eval.common import add_eval_args, check_common_args
from mimkit.models import create_backbone


def test_defaults_and_frozen():
    s = ExtractSettings()
    assert (s.img_size, s.n_last_blocks, s.precision, s.batch_size) == (None, 1, "fp32", 256)
    assert (s.device, s.workers, s.cache_dir, s.progress) == ("cpu", 0, None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 1
    assert dataclasses.replace(s, batch_size=8).batch_size == 8


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"precision": "int8"}, "unknown precision 'int8'; valid: fp32, bf16, fp16"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"n_last_blocks": 0}, "n_last_blocks=0 must be a positive integer"),
        ({"img_size": -32}, r"img_size=-32 must be a positive integer \(or None"),
        ({"workers": -1}, "workers=-1 must be a non-negative integer"),
        ({"batch_size": 2.5}, "batch_size=2.5 must be a positive integer"),
        ({"device": "gpu"}, "unknown device 'gpu'; valid: e.g. cpu, cuda"),
    ],
)
def test_bad_values_name_themselves_and_the_valid_ones(bad, message):
    with pytest.raises(ValueError, match=message):
        ExtractSettings(**bad)


def _parse(*argv: str, batch_size: int | None = 256) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_args(parser, batch_size=batch_size)
    args = parser.parse_args(["--encoder", "vit_tiny_patch16", "--train", "synthetic:shapes", *argv])
    check_common_args(parser, args)
    return args


def test_from_args_reads_the_shared_tool_arguments(tmp_path):
    args = _parse("--batch-size", "32", "--img-size", "48", "--precision", "bf16", "--device", "cpu",
                  "--workers", "3", "--cache-dir", str(tmp_path), "--no-progress")  # fmt: skip
    want = ExtractSettings(
        img_size=48,
        precision="bf16",
        batch_size=32,
        device="cpu",
        workers=3,
        cache_dir=tmp_path,
        progress=False,
    )
    assert args.extract == want == ExtractSettings.from_args(args)
    assert ExtractSettings.from_args(args, n_last_blocks=4).n_last_blocks == 4
    # a tool whose --batch-size defaults to None (the linear probe) extracts 256 images per pass
    assert _parse("--workers", "0", batch_size=None).extract.batch_size == 256


def test_check_common_args_turns_a_bad_value_into_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("--batch-size", "0")
    assert exc.value.code == 2 and "batch_size=0 must be a positive integer" in capsys.readouterr().err


def test_to_dict_is_json_and_leaves_out_progress(tmp_path):
    s = ExtractSettings(img_size=32, device=torch.device("cpu"), cache_dir=tmp_path)
    out = s.to_dict()
    assert json.loads(json.dumps(out)) == out and "progress" not in out
    assert out["device"] == "cpu" and out["cache_dir"] == str(tmp_path) and out["img_size"] == 32


def test_knn_eval_extracts_as_its_settings_say_and_records_them(monkeypatch):
    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    seen = []

    def fake_features(encoder, uri, split, extract):
        seen.append(extract)
        g = torch.Generator().manual_seed(len(seen))
        return {"cls": torch.randn(12, 32, generator=g), "label": torch.arange(12) % 3,
                "num_classes": torch.tensor(3)}  # fmt: skip

    monkeypatch.setattr(knn_module, "source_features", fake_features)
    asked = ExtractSettings(precision="bf16", batch_size=7, n_last_blocks=3, progress=False)
    res = knn_eval(model, "synthetic:shapes?size=32&train=12&val=12", ks=(5,), shots=(), extract=asked)
    # the size is resolved to the encoder's; k-NN reads the last block only
    assert seen == [dataclasses.replace(asked, img_size=32, n_last_blocks=1)] * 2
    assert res["settings"]["precision"] == "bf16"
    assert res["settings"]["extract"] == {"img_size": 32, "n_last_blocks": 1, "precision": "bf16",
                                          "batch_size": 7, "device": "cpu", "workers": 0,
                                          "cache_dir": None}  # fmt: skip
