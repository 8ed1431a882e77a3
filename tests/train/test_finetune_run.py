"""End-to-end runs of tools/finetune.py (and train.init_from in tools/pretrain.py) on CPU, each in its
own process, as tests/train/test_pretrain.py runs pretraining.

The fine-tune is MAE's protocol (RandAugment, random erasing, Mixup/CutMix, layer decay, drop path)
plus a weight average, on ViT-Ti cut to depth 2 at 32 px, from a seeded encoder export, on 32
textures images with 16 for validation: micro batch 4, global 8 (2 accumulated micro-batches),
4 steps an epoch, 6 steps, so the val split is scored at step 4 (epoch end) and 6 (the end).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.finetune import load_classifier
from mimkit.models import create_backbone, save_backbone
from mimkit.train import load_method
from mimkit.train.checkpoint import LATEST, tag_for
from tests.helpers import REPO, subprocess_env

FINETUNE = REPO / "tools" / "finetune.py"
PRETRAIN = REPO / "tools" / "pretrain.py"
STEPS = 6
BACKBONE = "{name: vit_tiny_patch16, img_size: 32, patch_size: 8, depth: 2}"

TINY = f"""\
defaults: {REPO / "recipes" / "finetune" / "default.yaml"}
method:
  backbone: {BACKBONE}
  num_classes: 3
data: {{source: "synthetic:textures?size=48&train=32&val=16", workers: 0}}
optim: {{lr: 1.0e-3, warmup_epochs: 1, layer_decay: 0.75}}
batch: {{global_size: 8, micro_size: 4}}
train: {{epochs: 3, max_steps: {STEPS}, precision: fp32, zero_stage: 0, ema_decay: 0.5}}
run: {{log_every: 1, checkpoint_every: 2, progress: false}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A seeded export of the fine-tune's backbone shape, standing in for a pretrained encoder."""
    directory = tmp_path_factory.mktemp("encoder")
    with torch.random.fork_rng():
        torch.manual_seed(123)
        save_backbone(create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2), directory)
    return directory


def run(tool: Path, recipe: Path, run_dir: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(tool), str(recipe), f"run.dir={run_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{name}: tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def straight(recipe, encoder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted reference fine-tune, with its random-init twin."""
    out = tmp_path_factory.mktemp("straight")
    proc = run(
        FINETUNE, recipe, out / "run", "--encoder", str(encoder), "--vs-random", "--json", str(out / "r.json")
    )
    return out / "run", proc


def test_a_fine_tune_writes_its_exports_evaluations_and_result(straight, encoder):
    run_dir, proc = straight
    assert "mimkit finetune: finetune on vit_tiny_patch16 finished" in proc.stdout
    assert f"train.init_from {encoder / 'encoder.safetensors'}: loaded" in proc.stderr
    assert "missing from the file (kept at their initialisation): none" in proc.stderr
    for name in ("model.safetensors", "encoder.safetensors", "classifier.safetensors", "classifier.json"):
        for directory in (run_dir, run_dir / "best", run_dir / "ema"):
            assert (directory / name).is_file(), directory / name

    evals = [m for m in _metrics(run_dir) if "val_top1" in m]
    assert [m["step"] for m in evals] == [4, STEPS]
    assert all(set(m) >= {"val_top1", "val_top5", "val_loss", "val_ema_top1"} for m in evals)
    result = json.loads((run_dir / "finetune.json").read_text())
    assert result["last"]["step"] == STEPS and result["last"]["top1"] == evals[-1]["val_top1"]
    best = max(evals, key=lambda m: (m["val_top1"], -m["step"]))
    assert result["best"]["step"] == best["step"] and result["best"]["top1"] == best["val_top1"]
    assert (run_dir / "checkpoints" / tag_for(best["step"])).is_dir()  # kept through pruning

    both = json.loads(Path(run_dir.parent / "r.json").read_text())
    assert both["pretrained"]["init_from"] == str(encoder) and both["random_init"]["random_init"]
    assert both["random_init"]["run_dir"] == str(run_dir) + "-random"
    assert "pretrained" in proc.stdout and "random init" in proc.stdout and "best top1" in proc.stdout

    # the classifier export is timm's model with the fine-tuned weights; best/ is the best step's
    method = load_method(run_dir)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(run_dir)(images), method.logits(images), rtol=0, atol=1e-5)
    assert json.loads((run_dir / "best" / "encoder.json").read_text())["pretrained"]["steps"] == best["step"]


def test_fine_tune_kill_and_resume_matches_uninterrupted(recipe, encoder, straight, tmp_path):
    reference, _ = straight
    run_dir = tmp_path / "run"
    # killed after step 5: the last checkpoint is step 4's, saved after its evaluation
    run(
        FINETUNE,
        recipe,
        run_dir,
        "--encoder",
        str(encoder),
        "debug.kill_after_step=5",
        "data.workers=2",
        expect=-signal.SIGKILL,
    )
    assert (run_dir / "checkpoints" / LATEST).read_text() == tag_for(4)
    assert not (run_dir / "model.safetensors").exists()

    proc = run(FINETUNE, recipe, run_dir, "--encoder", str(encoder))
    assert "resumed at step 4" in proc.stdout
    assert "train.init_from" not in proc.stderr  # a resumed run takes its weights from the checkpoint
    for name in ("model.safetensors", "classifier.safetensors"):
        for directory in (".", "best", "ema"):  # the weight average resumes too
            _same_weights(run_dir / directory, reference / directory, name)

    def curve(path):
        return [{k: v for k, v in m.items() if k not in ("time", "images_per_s")} for m in _metrics(path)]

    assert curve(run_dir) == curve(reference)


def test_init_from_with_a_wrong_shape_stops_before_training_naming_the_keys(recipe, tmp_path):
    wide = tmp_path / "wide"
    save_backbone(
        create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
        wide,
    )
    proc = run(FINETUNE, recipe, tmp_path / "run", f"train.init_from={wide}", expect=2)
    assert "finetune: recipe error: train.init_from" in proc.stderr
    assert "blocks.0.attn.qkv.weight: file (192, 64) vs encoder (576, 192)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pretraining_continues_from_an_exported_encoder(encoder, tmp_path):
    recipe = tmp_path / "mae.yaml"
    recipe.write_text(
        f"defaults: {REPO / 'recipes' / 'mae' / 'default.yaml'}\n"
        f"method: {{backbone: {BACKBONE}, decoder_dim: 32, decoder_depth: 1, decoder_heads: 2}}\n"
        'data: {source: "synthetic:shapes?size=32&train=16&val=8", workers: 0}\n'
        "batch: {global_size: 8, micro_size: 8}\n"
        "train: {epochs: 1, max_steps: 1, precision: fp32, zero_stage: 0}\n"
        "optim: {warmup_epochs: 1}\n"
        "run: {progress: false}\n"
    )
    # the first step runs at lr 0 (the warm-up starts there), so the encoder leaves it unchanged
    proc = run(PRETRAIN, recipe, tmp_path / "run", f"train.init_from={encoder}")
    assert "loaded 30 of the encoder's 30 tensors into method.encoder" in proc.stderr
    _same_weights(tmp_path / "run", encoder, "encoder.safetensors")
    exported = json.loads((tmp_path / "run" / "encoder.json").read_text())
    assert exported["pretrained"]["init_from"] == str(encoder)
