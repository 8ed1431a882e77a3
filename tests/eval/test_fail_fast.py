"""Every evaluation tool rejects a setting that cannot run before its first forward pass, and says what
to change. A counter on the patch embedding (every ViT forward pass starts there) proves the order."""

import importlib

import pytest
import torch
from PIL import Image
from timm.layers import PatchEmbed

from mimkit.models import create_backbone, save_backbone
from tests.eval import single_thread as _single_thread

single_thread = pytest.fixture(autouse=True)(_single_thread)

DATA = "synthetic:shapes?size=32&train=48&val=24"  # 7 classes; the smallest train class has 3 images
SEG = "synthetic:shapes?size=32&train=12&val=6"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(123)  # depth 4: the grid reads the last 4 blocks
    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)
    return save_backbone(model, tmp_path_factory.mktemp("export") / "tiny").parent


@pytest.fixture
def forwards(monkeypatch):
    """The number of encoder forward passes so far (patch-embedding calls)."""
    count = [0]
    original = PatchEmbed.forward

    def counting(self, x):
        count[0] += 1
        return original(self, x)

    monkeypatch.setattr(PatchEmbed, "forward", counting)
    return count


def _error(tool: str, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"mimkit.cli.{tool}").main([*args, "--workers", "0", "--no-progress"])
    assert exc.value.code == 2
    return capsys.readouterr().err


def _smallest_class(uri: str = DATA) -> int:
    from mimkit.data import build_source

    source = build_source(uri, "train", None)
    return int(torch.bincount(torch.tensor([source.scene(i).label for i in range(len(source))])).min())


def test_the_counter_counts_the_forward_passes_of_a_run_that_goes_through(encoder, forwards, capsys):
    importlib.import_module("mimkit.cli.knn").main(
        ["--encoder", str(encoder), "--train", DATA, "--ks", "5", "--shots", "1", "--tries", "1",
         "--workers", "0", "--no-progress", "--batch-size", "16"]
    )  # fmt: skip
    assert forwards[0] == 3 + 2  # 48 train and 24 val images, 16 per pass


def test_knn_shots_beyond_the_smallest_class(encoder, forwards, capsys):
    smallest = _smallest_class()
    err = _error(
        "knn", ["--encoder", str(encoder), "--train", DATA, "--ks", "5", "--shots", "1", "40"], capsys
    )
    assert f"has {smallest} training images, fewer than 40 per class; the largest valid is {smallest}" in err
    assert "--shots" in err and forwards[0] == 0


def test_knn_k_beyond_the_bank(encoder, forwards, capsys):
    err = _error("knn", ["--encoder", str(encoder), "--train", DATA, "--ks", "10", "100"], capsys)
    assert "--ks 100 exceeds the 48 training images; the largest valid is 48" in err and forwards[0] == 0


@pytest.mark.parametrize("cached", [False, True])
def test_linear_probe_mae_effective_batch_beyond_the_split(cached, encoder, forwards, capsys):
    args = ["--encoder", str(encoder), "--train", DATA, "--effective-batch", "64", "--batch-size", "16"]
    err = _error("linear_probe", args + (["--cached"] if cached else []), capsys)
    assert "the training split has 48 images, fewer than effective_batch=64" in err
    assert "the largest valid effective batch here is 48" in err and "--effective-batch 48" in err
    assert forwards[0] == 0


def test_linear_probe_mae_names_the_largest_valid_batch_of_the_reported_case():
    from mimkit.eval.linear_probe import MaeProbe, mae_plan

    with pytest.raises(
        ValueError, match="largest valid effective batch here is 9728 .*--effective-batch 9728"
    ):
        mae_plan(MaeProbe(), 10000)  # 19 forward passes of 512; the synthetic:shapes run


GRID_ERRORS = [
    ("--val-fraction", "val_fraction=1.5 must be in (0, 1)"),
    ("--epoch-length", "epoch_length=-3 non-negative"),
]


@pytest.mark.parametrize(("option", "message"), GRID_ERRORS)
@pytest.mark.parametrize("cached", [False, True])
def test_linear_probe_grid_settings(option, message, cached, encoder, forwards, capsys):
    value = "1.5" if option == "--val-fraction" else "-3"
    args = ["--encoder", str(encoder), "--train", DATA, "--preset", "grid", option, value]
    err = _error("linear_probe", args + (["--cached"] if cached else []), capsys)
    assert message in err and forwards[0] == 0


def test_compare_random_probe_batch_beyond_the_split(encoder, forwards, capsys):
    err = _error(
        "compare_random", ["--encoder", str(encoder), "--train", DATA, "--effective-batch", "64"], capsys
    )
    assert "fewer than effective_batch=64" in err and "--effective-batch 48" in err and forwards[0] == 0


def test_compare_random_seg_memory_is_checked_before_the_classification_pass(
    encoder, forwards, monkeypatch, capsys
):
    for module in ("mimkit.eval.preflight", "mimkit.eval.incontext"):
        monkeypatch.setattr(importlib.import_module(module), "available_bytes", lambda device: 1024)
    args = ["--encoder", str(encoder), "--train", DATA, "--effective-batch", "16", "--seg", SEG]
    err = _error("compare_random", args, capsys)
    assert "the memory bank" in err and "more than the 1.0 KiB free" in err and forwards[0] == 0


def test_incontext_seg_memory_beyond_the_free_memory(encoder, forwards, monkeypatch, capsys):
    for module in ("mimkit.eval.preflight", "mimkit.eval.incontext"):
        monkeypatch.setattr(importlib.import_module(module), "available_bytes", lambda device: 64 * 1024)
    err = _error("incontext", ["seg", "--encoder", str(encoder), "--train", SEG], capsys)
    assert "the memory bank (192 patches x 32 dims, fp32 keys" in err and "more than the 64.0 KiB free" in err
    assert forwards[0] == 0


def test_incontext_seg_memory_names_the_memory_size_that_fits(encoder, forwards, monkeypatch, capsys):
    # room for the search blocks and about half the bank: the advice is a smaller --memory-size
    from mimkit.eval.incontext import memory_plan
    from mimkit.eval.preflight import MEMORY_HEADROOM

    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    plan = memory_plan(model, 12, 8, memory_size=None, aug_epochs=1, k=30, key_dtype="fp32", device="cpu")
    b = plan["bytes"]
    bank = b["keys"] + b["values"]  # 192 patches; half a patch more than half of them fit
    free = int((b["block"] + b["topk"] + bank / 2 + bank / 192 / 2) / MEMORY_HEADROOM)
    for module in ("mimkit.eval.preflight", "mimkit.eval.incontext"):
        monkeypatch.setattr(importlib.import_module(module), "available_bytes", lambda device: free)
    err = _error("incontext", ["seg", "--encoder", str(encoder), "--train", SEG], capsys)
    assert "pass --memory-size 96 or smaller" in err and "--key-dtype fp16" in err and forwards[0] == 0


def test_incontext_seg_k_beyond_the_memory(encoder, forwards, capsys):
    err = _error(
        "incontext", ["seg", "--encoder", str(encoder), "--train", SEG, "--memory-size", "24"], capsys
    )
    assert "--k 30 exceeds the 24 patches the memory bank can hold; the largest valid is 24" in err
    assert forwards[0] == 0


@pytest.mark.parametrize("tool", ["knn", "linear_probe", "attentive_probe"])
def test_an_img_size_the_patches_do_not_tile(tool, encoder, forwards, capsys):
    err = _error(tool, ["--encoder", str(encoder), "--train", DATA, "--img-size", "30"], capsys)
    assert "img_size=30 is not a multiple of the encoder's patch size 8" in err and "24 and 32" in err
    assert forwards[0] == 0


def test_incontext_seg_img_size_the_patches_do_not_tile(encoder, forwards, capsys):
    err = _error("incontext", ["seg", "--encoder", str(encoder), "--train", SEG, "--img-size", "36"], capsys)
    assert "not a multiple of the encoder's patch size 8; the nearest valid sizes are 32 and 40" in err
    assert forwards[0] == 0


def test_incontext_cls_shots_beyond_the_smallest_class(encoder, forwards, capsys):
    err = _error(
        "incontext", ["cls", "--encoder", str(encoder), "--train", DATA, "--shots", "1", "40"], capsys
    )
    assert "fewer than 40 per class" in err and forwards[0] == 0


def test_incontext_cls_unlabelled_val_before_the_train_features(encoder, forwards, tmp_path, capsys):
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    args = ["cls", "--encoder", str(encoder), "--train", DATA, "--val", f"folder:{tmp_path}", "--shots", "1"]
    err = _error("incontext", args, capsys)
    assert "yields no labels" in err and forwards[0] == 0


@pytest.mark.parametrize("cached", [False, True])
def test_attentive_probe_batch_beyond_the_split(cached, encoder, forwards, capsys):
    args = ["--encoder", str(encoder), "--train", DATA, "--batch-size", "64"] + (
        ["--cached"] if cached else []
    )
    err = _error("attentive_probe", args, capsys)
    assert "fewer than one batch of 64" in err and "pass --batch-size 48 or smaller" in err
    assert forwards[0] == 0


def test_attentive_probe_default_batch_names_the_option(encoder, forwards, capsys):
    err = _error("attentive_probe", ["--encoder", str(encoder), "--train", DATA], capsys)
    assert "fewer than one batch of 1024 (V-JEPA: 1024)" in err and forwards[0] == 0


def test_attentive_probe_token_cache_beyond_the_free_memory(encoder, forwards, monkeypatch, capsys):
    monkeypatch.setattr(
        importlib.import_module("mimkit.eval.preflight"), "available_bytes", lambda d: 100_000
    )
    args = ["--encoder", str(encoder), "--train", DATA, "--batch-size", "16", "--cached"]
    err = _error("attentive_probe", args, capsys)
    # (48 + 24) images x 16 patches x 32 dims x 4 bytes
    assert "the token cache (48 train + 24 val images x 16 patches x 32 dims, float32) needs 144.0 KiB" in err
    assert "drop --cached" in err and forwards[0] == 0


def test_attentive_probe_heads_that_do_not_divide_the_width(encoder, forwards, capsys):
    err = _error("attentive_probe", ["--encoder", str(encoder), "--train", DATA, "--num-heads", "3"], capsys)
    assert "num_heads=3 does not divide the token width 32; valid: 1, 2, 4, 8, 16, 32" in err
    assert forwards[0] == 0


def test_linear_probe_grid_blocks_beyond_the_encoders_depth(forwards, tmp_path, capsys):
    shallow = create_backbone(
        "vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2
    )
    export = save_backbone(shallow, tmp_path / "shallow").parent
    err = _error("linear_probe", ["--encoder", str(export), "--train", DATA, "--preset", "grid"], capsys)
    assert "n_last_blocks=4 needs the last 4 blocks; the encoder has 2" in err and forwards[0] == 0
