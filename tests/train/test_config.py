"""Recipes: loading, overlays, overrides, and errors that name the key before anything runs."""

import dataclasses
from dataclasses import MISSING
from pathlib import Path

import pytest
import yaml

from mimkit.train import RecipeError, load_recipe
from mimkit.train.config import BASE_RECIPE, SECTIONS, Recipe, apply_override, parse_yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
DEMO = REPO / "recipes" / "demo" / "mae_vit_tiny.yaml"


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {
        "mae/vit_base_patch16_in1k.yaml",
        "mae/vit_large_patch16_in1k.yaml",
        "demo/mae_vit_tiny.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_validates_without_building_a_model(path, monkeypatch):
    import mimkit.models.backbone as backbone

    def no_models(*args, **kwargs):
        raise AssertionError("validating a recipe must not build a model")

    monkeypatch.setattr(backbone, "create_backbone", no_models)
    for world_size in (1, 2, 64) if "mae/" in path.as_posix() else (1, 2):
        recipe = load_recipe(path, world_size=world_size, check_data=False)
        assert isinstance(recipe, Recipe)
        assert recipe.accumulation * recipe.batch.micro_size * world_size == recipe.batch.global_size


def test_paper_recipes_hold_the_paper_settings():
    for name, backbone, epochs in (
        ("vit_base_patch16_in1k", "vit_base_patch16", 800),
        ("vit_large_patch16_in1k", "vit_large_patch16", 1600),
    ):
        r = load_recipe(REPO / "recipes" / "mae" / f"{name}.yaml", check_data=False)
        assert r.method.backbone["name"] == backbone and r.img_size == 224
        assert r.batch.global_size == 4096 and r.lr == pytest.approx(1.5e-4 * 4096 / 256)
        assert r.optim.betas == [0.9, 0.95] and r.optim.weight_decay == 0.05
        assert r.optim.warmup_epochs == 40 and r.optim.min_lr == 0 and r.train.epochs == epochs
        assert r.method.mask == {"type": "random", "ratio": 0.75}
        assert r.method.options["norm_pix_loss"] is True
        assert (r.method.options["decoder_dim"], r.method.options["decoder_depth"]) == (512, 8)
        assert r.method.options["decoder_heads"] == 16


def test_base_recipe_is_the_one_source_of_defaults():
    raw = yaml.safe_load(BASE_RECIPE.read_text())
    assert "method" not in raw  # method options default to the method's constructor
    for name, cls in SECTIONS.items():
        fields = dataclasses.fields(cls)
        with_default = [
            f.name for f in fields if f.default is not MISSING or f.default_factory is not MISSING
        ]
        assert not with_default, f"{cls.__name__} holds defaults of its own: {with_default}"
        if name != "method":
            missing = {f.name for f in fields} - set(raw[name])
            assert not missing, f"{BASE_RECIPE.name} lacks {name}: {sorted(missing)}"


def test_method_files_hold_only_what_differs_from_the_base():
    base = yaml.safe_load(BASE_RECIPE.read_text())
    for path in (
        REPO / "recipes" / "mae" / "default.yaml",
        REPO / "recipes" / "cae" / "vit_base_patch16_in1k.yaml",
    ):
        raw = yaml.safe_load(path.read_text())
        for section, values in raw.items():
            if section in ("method", "defaults"):
                continue
            same = sorted(k for k, v in values.items() if base[section].get(k) == v)
            assert not same, f"{path.name} repeats the base's {section}: {same}"


def test_a_recipe_must_name_its_method_and_backbone(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {workers: 0}\n")
    with pytest.raises(
        RecipeError, match=r"method needs a name and a backbone.*methods: cae, cmae, finetune, mae"
    ):
        load_recipe(path, check_data=False)


def test_overrides_are_yaml_and_nested():
    r = load_recipe(
        DEMO,
        [
            "optim.base_lr=1e-3",
            "optim.lr=null",
            "method.backbone.img_size=32",
            "optim.betas=[0.8, 0.9]",
            "run.dir=/tmp/x",
            "train.max_steps=7",
        ],
    )
    assert r.optim.base_lr == 1e-3 and isinstance(r.optim.base_lr, float)
    assert r.lr == pytest.approx(1e-3 * r.batch.global_size / 256)
    assert r.method.backbone["img_size"] == 32 and r.img_size == 32
    assert r.optim.betas == [0.8, 0.9] and r.run.dir == "/tmp/x" and r.train.max_steps == 7


def test_floats_without_a_dot_parse_as_floats():
    assert parse_yaml("1.5e-4") == 1.5e-4 and parse_yaml("1e-3") == 1e-3 and parse_yaml("3") == 3


def test_overlay_merges_over_defaults(tmp_path):
    method = "method: {name: mae, backbone: {name: vit_tiny_patch16}}\n"
    base = "optim: {base_lr: 1.0e-3, weight_decay: 0.1}\nrun: {seed: 3}\n"
    (tmp_path / "base.yaml").write_text(method + base)
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\noptim: {weight_decay: 0.2}\n")
    r = load_recipe(tmp_path / "child.yaml", check_data=False)
    assert (r.optim.base_lr, r.optim.weight_decay, r.run.seed) == (1e-3, 0.2, 3)
    assert r.run.dir == str(Path("runs") / "child")


def _error(overrides, world_size=1, path=DEMO):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, world_size=world_size)
    return str(info.value)


def test_unknown_keys_name_the_key_and_suggest():
    msg = _error(["optim.lrr=1e-3"])
    assert "optim.lrr" in msg and "did you mean optim.lr?" in msg and "optim.weight_decay" in msg
    msg = _error(["optimm.lr=1e-3"])
    assert "optimm" in msg and "did you mean optim?" in msg
    msg = _error(["method.decoder_dims=64"])
    assert "method.decoder_dims" in msg and "method.decoder_dim" in msg
    msg = _error(["method.backbone.patchsize=4"])
    assert "method.backbone.patchsize" in msg and "patch_size" in msg


@pytest.mark.parametrize(
    "override, words",
    [
        ("batch.micro_size=abc", ["batch.micro_size", "integer", "abc"]),
        ("train.zero_stage=1.5", ["train.zero_stage", "integer"]),
        ("method.norm_pix_loss=3", ["method.norm_pix_loss", "true or false"]),
        ("optim.betas=0.9", ["optim.betas", "list"]),
        ("run.seed=true", ["run.seed", "integer"]),
        ("train.grad_checkpointing=sometimes", ["train.grad_checkpointing", "true or false"]),
    ],
)
def test_wrong_types(override, words):
    msg = _error([override])
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.base_lr=-1e-3", ["optim.base_lr", "positive"]),
        ("method.mask.ratio=1.5", ["method.mask", "(0, 1)"]),
        ("train.precision=fp8", ["train.precision", "fp32, bf16, fp16"]),
        ("train.zero_stage=4", ["train.zero_stage", "0, 1, 2, 3"]),
        ("optim.warmup_epochs=100", ["optim.warmup_epochs", "train.epochs"]),
        ("data.img_size=48", ["data.img_size=48", "method.backbone.img_size=64"]),
        ("method.backbone.name=vit_gigantic", ["method.backbone.name", "vit_base_patch16"]),
        ("data.source=s3://bucket", ["data.source", "synthetic:", "folder:"]),
    ],
)
def test_impossible_values(override, words):
    msg = _error([override])
    assert all(w in msg for w in words), msg


def test_batch_must_divide_by_micro_times_world_size():
    msg = _error(["batch.global_size=64", "batch.micro_size=16"], world_size=3)
    assert "batch.global_size=64" in msg and "16 x 3 = 48" in msg
    load_recipe(DEMO, ["batch.global_size=64", "batch.micro_size=16"], world_size=4)


def test_missing_folder_is_an_error(tmp_path):
    msg = _error([f"data.source=folder:{tmp_path}/nope"])
    assert "data.source" in msg and f"{tmp_path}/nope" in msg and "does not exist" in msg


def test_malformed_override():
    assert "section.key=value" in _error(["optim.lr"])
    with pytest.raises(RecipeError, match="not a section"):
        apply_override({"optim": {"lr": 1.0}}, "optim.lr.x=2")


def test_tool_reports_recipe_errors_before_training(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_tool", REPO / "tools" / "pretrain.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run_dir = tmp_path / "run"
    code = tool.main([str(DEMO), f"run.dir={run_dir}", "optim.weight_decy=0.1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "recipe error" in err and "optim.weight_decy" in err and "optim.weight_decay" in err
    assert not run_dir.exists()


# ---------------------------------------------------------------- image format


def test_data_channels_set_the_backbone_and_a_mismatch_is_named():
    r = load_recipe(DEMO, ["data.channels=1"], check_data=False)
    assert r.channels == 1 and r.method.backbone["in_chans"] == 1
    assert r.normalization.channels == 1  # ImageNet's grey statistics by default
    r = load_recipe(DEMO, ["method.backbone.in_chans=1"], check_data=False)
    assert r.channels == 1
    with pytest.raises(RecipeError, match=r"data.channels=3 differs from method.backbone.in_chans=1"):
        load_recipe(DEMO, ["data.channels=3", "method.backbone.in_chans=1"], check_data=False)
    with pytest.raises(RecipeError, match=r"data.channels must be one of 1, 3 or null, got 2"):
        load_recipe(DEMO, ["data.channels=2"], check_data=False)


def test_mismatched_channels_fail_before_any_model_is_built(monkeypatch):
    import mimkit.models.backbone as backbone

    monkeypatch.setattr(backbone, "create_backbone", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(RecipeError, match="in_chans=3"):
        load_recipe(DEMO, ["data.channels=1", "method.backbone.in_chans=3"], check_data=False)


def test_data_mean_std_lists_auto_and_errors():
    r = load_recipe(DEMO, ["data.channels=1", "data.mean=[0.3]", "data.std=[0.2]"], check_data=False)
    assert r.normalization.mean == (0.3,) and r.normalization.std == (0.2,)
    r = load_recipe(DEMO, ["data.mean=auto", "data.std=auto"], check_data=False)
    assert r.data.mean == "auto"
    with pytest.raises(RecipeError, match="not resolved yet"):
        _ = r.normalization
    with pytest.raises(RecipeError, match=r"data.mean must be auto, null .*one number per channel \(3"):
        load_recipe(DEMO, ["data.mean=[0.5]"], check_data=False)
    with pytest.raises(RecipeError, match=r"data.std must be auto, null"):
        load_recipe(DEMO, ["data.std=automatic"], check_data=False)
    with pytest.raises(RecipeError, match=r"data.std must be positive numbers"):
        load_recipe(DEMO, ["data.std=[0.2, 0, 0.2]"], check_data=False)


def test_crop_scale_is_checked_and_cae_uses_its_own():
    assert load_recipe(DEMO, check_data=False).data.crop_scale == [0.2, 1.0]
    cae = load_recipe(REPO / "recipes" / "cae" / "vit_base_patch16_in1k.yaml", check_data=False)
    assert cae.data.crop_scale == [0.08, 1.0]
    for bad in ("[0.5, 0.2]", "[0, 1]", "[0.2]", "[0.2, 1.5]"):
        with pytest.raises(RecipeError, match="data.crop_scale must be two area fractions"):
            load_recipe(DEMO, [f"data.crop_scale={bad}"], check_data=False)
