"""Fine-tuning's parts in process: layer decay, Mixup, the head, the classifier export, train.init_from
and the recipe checks. Models are ViT-Ti cut to depth 2 at 32 px (16 patches)."""

import random

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from mimkit.finetune import FineTune, finetune_transform, load_classifier, save_classifier
from mimkit.finetune.run import check_finetune, random_init_recipe, result_table
from mimkit.interop.timm import resample_table
from mimkit.models import create_backbone, save_backbone
from mimkit.ssl import build_method
from mimkit.train import RecipeError, load_recipe
from mimkit.train.config import from_dict
from mimkit.train.init_from import InitShapeError, load_init
from mimkit.train.optim import build_adamw
from mimkit.train.trainer import set_lr
from tests.helpers import REPO

TINY = {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2}
DEPTH = TINY["depth"]
TEXTURES = "synthetic:textures?size=48&train=32&val=16"


def _finetune(**options) -> FineTune:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_method({"name": "finetune", "backbone": {**TINY, "pos_embed": "learn"}, **options})


def test_layer_decay_gives_the_documented_lr_to_patch_embedding_blocks_and_head():
    model = _finetune(num_classes=3)
    decay, lr = 0.5, 1e-3
    optimizer = build_adamw(
        model, lr, (0.9, 0.999), 1e-8, 0.05, ["pos_embed", "_token"], torch.device("cpu"), decay
    )
    set_lr(optimizer, lr)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    top = DEPTH + 1  # MAE's numbering: the stem is layer 0, block i layer i + 1, the head layer depth + 1
    expected = {
        "encoder.patch_embed.proj.weight": lr * decay**top,
        "encoder.cls_token": lr * decay**top,
        "encoder.pos_embed": lr * decay**top,
        **{f"encoder.blocks.{i}.attn.qkv.weight": lr * decay ** (top - (i + 1)) for i in range(DEPTH)},
        **{f"encoder.blocks.{i}.norm1.bias": lr * decay ** (top - (i + 1)) for i in range(DEPTH)},
        "fc_norm.weight": lr,
        "head.weight": lr,
        "head.bias": lr,
    }
    for name, value in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(value), name
    assert decay_of[id(params["encoder.blocks.0.attn.qkv.weight"])] == 0.05
    for exempt in ("encoder.pos_embed", "encoder.cls_token", "head.bias", "fc_norm.weight"):
        assert decay_of[id(params[exempt])] == 0.0, exempt
    # the encoder's final norm is replaced by fc_norm under global pooling: frozen, in no group
    assert id(params["encoder.norm.weight"]) not in lr_of
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_mixup_targets_sum_to_one_and_mix_the_images():
    model = _finetune(num_classes=4, mixup=0.8, cutmix=0.0, label_smoothing=0.1).train()
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    np.random.seed(3)
    mixed, targets = model.mixup(images.clone(), labels)
    assert targets.shape == (6, 4)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    lam = float(targets[0, 0] - 0.1 / 4) / (1 - 0.1)  # sample 0 (class 0) is mixed with sample 5 (class 1)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0), rtol=0, atol=1e-5)
    assert 0 < lam < 1


def test_a_tiny_finetune_overfits_a_small_batch_and_evaluates_it():
    model = _finetune(num_classes=4, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    assert model.mixup is None
    batch = {
        "image": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        "label": torch.arange(8) % 4,
    }
    optimizer = build_adamw(model, 1e-3, (0.9, 0.999), 1e-8, 0.0, [], torch.device("cpu"), 0.75)
    set_lr(optimizer, 1e-3)
    model.train()
    first = None
    for _ in range(60):
        loss = model(batch)["loss"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05 < first
    sums = model.eval().evaluate(batch)
    assert float(sums["count"]) == 8 and float(sums["top1"]) == 800 and float(sums["top5"]) == 800


def test_classifier_export_loads_into_timm_with_the_same_logits(tmp_path):
    for pool in ("avg", "token"):
        model = _finetune(num_classes=5, global_pool=pool, head_init_std=0.5).eval()
        save_classifier(model, tmp_path / pool, {"method": "finetune"})
        timm_model = load_classifier(tmp_path / pool)
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(timm_model(images), model.logits(images), rtol=0, atol=1e-5)


def test_posterize_at_the_top_magnitude_gives_black_instead_of_failing():
    from PIL import Image

    from mimkit.data.transforms import Normalization
    from mimkit.finetune.transforms import posterize

    grey = Image.new("RGB", (4, 4), (200, 100, 50))
    assert posterize(grey, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize(grey, 1).getpixel((0, 0)) == (128, 0, 0)
    # magnitude 10 without noise: every posterize keeps 0 bits, which Pillow 13 refuses
    transform = finetune_transform(16, Normalization(), (0.5, 1.0), "rand-m10-mstd0-inc1", 0.0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(300):
            transform({"image": image})


def test_finetune_transform_follows_the_torch_seed_and_leaves_other_streams_alone():
    from mimkit.data.transforms import Normalization

    transform = finetune_transform(32, Normalization(), (0.08, 1.0), "rand-m9-mstd0.5-inc1", 0.25)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    outs = []
    for _ in range(2):
        random.seed(5)
        np.random.seed(5)
        with torch.random.fork_rng():
            torch.manual_seed(11)
            outs.append(transform({"image": image, "label": 2}))
        assert (random.random(), np.random.rand()) == before  # the process's own streams are untouched
    assert outs[0]["label"] == 2 and outs[0]["image"].shape == (3, 32, 32)
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    with torch.random.fork_rng():
        torch.manual_seed(12)
        assert not torch.equal(transform({"image": image, "label": 2})["image"], outs[0]["image"])


# --------------------------------------------------------------------------- train.init_from


def _export(tmp_path, seed: int = 7, **arch):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = create_backbone(**{**TINY, **arch})
    save_backbone(encoder, tmp_path)
    return encoder


def test_init_from_loads_the_encoder_weights_exactly(tmp_path):
    source = _export(tmp_path / "export")
    for name in ("mae", "finetune"):
        method = build_method(
            {"name": name, "backbone": TINY}
            | ({"decoder_dim": 32, "decoder_depth": 1} if name == "mae" else {})
        )
        report = load_init(method.encoder, tmp_path / "export")
        assert report.missing == [] and report.ignored == [] and report.resized == []
        for key, value in source.state_dict().items():
            assert torch.equal(method.encoder.state_dict()[key], value), key
    # a whole method's weights (model.safetensors) are read through their encoder. keys
    from safetensors.torch import save_file

    mae = build_method({"name": "mae", "backbone": TINY, "decoder_dim": 32, "decoder_depth": 1})
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(tmp_path / "model.safetensors"))
    target = build_method({"name": "finetune", "backbone": TINY})
    report = load_init(target.encoder, tmp_path / "model.safetensors")
    assert report.missing == [] and report.ignored == []
    assert torch.equal(target.encoder.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)


def test_init_from_reports_missing_and_ignored_keys_and_resamples_the_position_table(tmp_path):
    source = _export(tmp_path / "export", img_size=64, pos_embed="learn")
    state = {**source.state_dict(), "decoder_pred.weight": torch.zeros(3, 3)}
    del state["blocks.1.mlp.fc2.bias"]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "official.safetensors"))
    encoder = create_backbone(**{**TINY, "pos_embed": "learn"})
    report = load_init(encoder, tmp_path / "official.safetensors")
    assert report.missing == ["blocks.1.mlp.fc2.bias"] and report.ignored == ["decoder_pred.weight"]
    assert report.resized == ["pos_embed (1, 65, 192) -> (1, 17, 192)"]
    expected = resample_table(source.pos_embed.detach(), (8, 8), (4, 4))
    assert torch.equal(encoder.pos_embed.detach(), expected)
    assert "missing from the file (kept at their initialisation): blocks.1.mlp.fc2.bias" in report.describe()


def test_init_from_with_a_wrong_shape_names_the_keys_and_both_shapes(tmp_path):
    _export(tmp_path / "small", embed_dim=64, num_heads=2)
    method = build_method({"name": "finetune", "backbone": TINY})
    with pytest.raises(InitShapeError) as info:
        load_init(method.encoder, tmp_path / "small")
    message = str(info.value)
    assert "blocks.0.attn.qkv.weight: file (192, 64) vs encoder (576, 192)" in message
    assert "cls_token: file (1, 1, 64) vs encoder (1, 1, 192)" in message
    assert "'embed_dim': 64" in message and "method.backbone" in message


# --------------------------------------------------------------------------- recipe checks

DEMO = REPO / "recipes" / "finetune" / "demo_vit_tiny.yaml"


def _tiny_recipe(tmp_path, *overrides: str):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"defaults: {REPO / 'recipes' / 'finetune' / 'default.yaml'}\n"
        f"method: {{backbone: {TINY}, num_classes: 3}}\n"
        f"data: {{source: '{TEXTURES}', workers: 0}}\n"
        "batch: {global_size: 8, micro_size: 4}\n"
        f"run: {{dir: {tmp_path / 'run'}}}\n"
    )
    return load_recipe(path, list(overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.num_classes=0", r"method.num_classes must be a positive integer .*got 0"),
        ("method.global_pool=max", r"method.global_pool must be one of 'avg', 'token', got 'max'"),
        ("method.mixup_prob=2", r"method.mixup_prob must be a probability in \[0, 1\], got 2"),
        ("method.label_smoothing=1", r"method.label_smoothing must be a number in \[0, 1\)"),
        ("method.mask={type: random}", r"method.mask: method 'finetune' masks nothing"),
        ("method.num_clases=3", r"unknown key method.num_clases \(did you mean method.num_classes\?\)"),
        ("optim.layer_decay=1.5", r"optim.layer_decay must be a factor in \(0, 1\] or null"),
        ("data.auto_augment=rand-m9x", r"data.auto_augment 'rand-m9x': not a timm augmentation policy"),
        ("data.random_erase=2", r"data.random_erase must be a probability in \[0, 1\], got 2"),
        ("data.transform=finetuning", r"data.transform must be one of pretrain, eval, none, finetune"),
        ("eval.split=test", r"eval.split must be one of train, val or null, got 'test'"),
        ("eval.best_metric=top3", r"eval.best_metric must be one of top1, top5, loss"),
        ("eval.source=imagenet", r"eval.source 'imagenet' has no known scheme"),
        ("train.init_from=/nonexistent/enc", r"train.init_from '/nonexistent/enc' does not exist"),
        ("train.ema_decay=1", r"train.ema_decay must be a decay in \(0, 1\) or null \(off\), got 1"),
        ("train.zero_stage=3 & train.ema_decay=0.99", r"train.ema_decay needs every weight on every rank"),
    ],
)
def test_finetune_recipe_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        _tiny_recipe(tmp_path, *override.split(" & "))


def test_keys_a_method_cannot_use_are_errors_naming_the_methods_that_can(tmp_path):
    mae = REPO / "recipes" / "mae" / "default.yaml"
    with pytest.raises(
        RecipeError, match=r"optim.layer_decay=0.65 needs a method that numbers its layers.*finetune"
    ):
        load_recipe(mae, ["optim.layer_decay=0.65"], check_data=False)
    with pytest.raises(RecipeError, match=r"method 'mae' has no evaluation of its own.*evaluate: finetune"):
        load_recipe(mae, ["eval.split=val"], check_data=False)


def test_the_data_checks_name_the_key(tmp_path):
    check_finetune(_tiny_recipe(tmp_path))
    with pytest.raises(
        RecipeError, match=r"method.num_classes=2 but data.source .* has 3 classes \(fine, medium, coarse\)"
    ):
        check_finetune(_tiny_recipe(tmp_path, "method.num_classes=2"))
    with pytest.raises(RecipeError, match=r"batch.micro_size=1 must be even"):
        check_finetune(_tiny_recipe(tmp_path, "batch.micro_size=1"))
    check_finetune(_tiny_recipe(tmp_path, "batch.micro_size=1", "method.mixup=0", "method.cutmix=0"))
    with pytest.raises(RecipeError, match=r"method.name must be finetune"):
        check_finetune(load_recipe(REPO / "recipes" / "mae" / "default.yaml", check_data=False))


def test_the_random_init_twin_and_the_table(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    raw = recipe.to_dict()
    raw["train"]["init_from"] = str(tmp_path)
    twin = random_init_recipe(from_dict(raw))
    assert twin.train.init_from is None and twin.run.dir == str(tmp_path / "run") + "-random"
    row = {
        "run_dir": "r",
        "best": {"step": 4, "top1": 50.0, "top5": 100.0},
        "last": {"top1": 40.0, "top5": 100.0},
    }
    table = result_table({"pretrained": row, "random init": {**row, "best": None}})
    assert "pretrained        50.00    100.00     40.00    100.00        4  r" in table
    assert "random init           -         -     40.00" in table


def test_the_fine_tune_recipes_hold_maes_protocol():
    base = load_recipe(REPO / "recipes" / "finetune" / "vit_base_patch16_in1k.yaml", check_data=False)
    large = load_recipe(REPO / "recipes" / "finetune" / "vit_large_patch16_in1k.yaml", check_data=False)
    for r, lr, decay, drop, epochs in ((base, 5e-4, 0.65, 0.1, 100), (large, 1e-3, 0.75, 0.2, 50)):
        assert r.lr == pytest.approx(lr * 1024 / 256) and r.optim.layer_decay == decay
        assert r.method.backbone["drop_path_rate"] == drop and r.train.epochs == epochs
        assert r.optim.betas == [0.9, 0.999] and r.optim.weight_decay == 0.05 and r.optim.warmup_epochs == 5
        assert r.data.auto_augment == "rand-m9-mstd0.5-inc1" and r.data.random_erase == 0.25
        o = r.method.options
        assert (o["mixup"], o["cutmix"], o["label_smoothing"], o["global_pool"]) == (0.8, 1.0, 0.1, "avg")
        assert r.eval.split == "val" and r.eval.best_metric == "top1"


def test_the_step_benchmark_times_the_same_model_as_its_timm_reference():
    import argparse

    from benchmarks import step as step_bench
    from benchmarks.finetune_reference import TimmFinetunePath
    from mimkit.train.distributed import init_distributed

    parser = argparse.ArgumentParser()
    step_bench.add_args(parser)
    args = parser.parse_args(
        ["--method", "finetune", "--backbone", "vit_tiny_patch16", "--img-size", "32", "--batch", "4"]
        + ["--zero-stage", "0", "--set", "method.backbone.patch_size=8", "method.backbone.depth=2"]
    )
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 5, 9, 999])
    path = step_bench.TrainerPath(
        step_bench.build_recipe("finetune", args, "fp32"), init_distributed(), images, labels
    )
    r = path.recipe
    assert r.optim.layer_decay == 0.65 and r.method.backbone["drop_path_rate"] == 0.1
    reference = TimmFinetunePath.from_finetune(path.module, images, labels, r.lr, r.optim.layer_decay)

    np.random.seed(0)  # the same Mixup draw
    torch.manual_seed(0)  # and the same drop path
    loss = path.engine(path.batch())["loss"]
    path.engine.backward(loss)
    np.random.seed(0)
    torch.manual_seed(0)
    mixed, targets = reference.mixup(images.clone(), labels)
    ref_loss = reference.loss(reference.model(mixed), targets)
    ref_loss.backward()
    losses = [loss, ref_loss]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
    ours = {k.removeprefix("encoder."): p.grad for k, p in path.module.named_parameters() if p.requires_grad}
    theirs = {k: p.grad for k, p in reference.model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for key, grad in ours.items():
        torch.testing.assert_close(grad, theirs[key], rtol=0, atol=1e-5, msg=key)
