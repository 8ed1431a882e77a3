"""The registry contract, for every entry of every registry a recipe names."""

import subprocess
import sys
from typing import Literal

import pytest
import torch

from mimkit.data.sources import SCHEMES
from mimkit.models.backbone import BACKBONES
from mimkit.registry import OptionError, Registry, check_type
from mimkit.ssl import masking
from mimkit.ssl.cae_targets import TARGETS
from mimkit.ssl.registry import METHODS, build_method
from tests.helpers import REPO

TINY_BACKBONE = {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2}
# What an entry needs beyond its defaults to be built small: methods get a tiny backbone (and a
# mask that suits them), a token target a stand-in tokenizer.
NEEDS = {
    ("method", "mixedae"): {"mix_ratio": 0.25, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    ("target", "tokens"): {"tokenizer": "torch.nn:Identity"},
}
ENTRIES = (
    [("backbone", n) for n in BACKBONES.names()]
    + [("method", n) for n in METHODS.names()]
    + [("mask", n) for n in masking.MASKS.names()]
    + [("target", n) for n in TARGETS.names()]
)
REGISTRIES = {"backbone": BACKBONES, "method": METHODS, "mask": masking.MASKS, "target": TARGETS}


def _build(kind: str, name: str, options: dict):
    registry = REGISTRIES[kind]
    cfg = {registry.key: name, **NEEDS.get((kind, name), {}), **options}
    if kind == "backbone":
        return BACKBONES.build({**cfg, **{k: v for k, v in TINY_BACKBONE.items() if k != "name"}})
    if kind == "method":
        return build_method({**cfg, "backbone": TINY_BACKBONE})
    if kind == "target":
        return TARGETS.build(cfg, patch_size=8, in_chans=3)
    return registry.build(cfg)


@pytest.mark.parametrize("kind, name", ENTRIES, ids=lambda v: v)
def test_entry_builds_from_its_defaults_and_round_trips_its_options(kind, name):
    registry = REGISTRIES[kind]
    defaults = {
        k: v
        for k, v in registry.defaults(name).items()
        if k not in NEEDS.get((kind, name), {}) and v is not None
    }
    defaults = {k: v for k, v in defaults.items() if repr(v) != "<preset>"}
    typed = registry.validate({registry.key: name, **defaults})
    assert typed == {registry.key: name, **defaults}  # defaults pass their own annotations unchanged
    with torch.random.fork_rng():
        built = _build(kind, name, defaults)
    assert built is not None


@pytest.mark.parametrize("kind, name", ENTRIES, ids=lambda v: v)
def test_entry_rejects_an_unknown_key_and_a_wrongly_typed_value_naming_the_key(kind, name):
    registry = REGISTRIES[kind]
    options = registry.options(name)
    valid = next(iter(options))
    with pytest.raises(OptionError, match=rf"unknown key {valid}x \(did you mean {valid}\?\).*valid: "):
        registry.validate({registry.key: name, f"{valid}x": 1})
    typed = [o for o in options.values() if o.annotation in (int, float, bool)]
    if kind == "mask":
        typed = [options["ratio"]]
    assert typed, f"{kind} {name} has no plainly typed option to test"
    with pytest.raises(OptionError, match=rf"{typed[0].name} must be .*got 'many'"):
        registry.validate({registry.key: name, typed[0].name: "many"})


def test_every_registry_refuses_a_duplicate_name():
    for registry in (*REGISTRIES.values(), SCHEMES):
        name = registry.names()[0]
        with pytest.raises(ValueError, match=f"{name!r} is already registered"):
            registry.register(name)(lambda **kw: None)


def test_unknown_names_list_the_valid_ones_with_a_suggestion():
    with pytest.raises(OptionError, match=r"'vit_tiny_patch61' is not a registered backbone \(did you mean"):
        BACKBONES.get("vit_tiny_patch61")
    with pytest.raises(OptionError, match=r"valid: cae, cmae, finetune, mae, mixedae"):
        METHODS.get("mea")


def test_check_type_reads_lists_optionals_and_literals():
    assert check_type("k", [1, 2], list[int]) == [1, 2]
    assert check_type("k", (1, 2), list[int]) == [1, 2]
    assert check_type("k", 3, float) == 3.0 and isinstance(check_type("k", 3, float), float)
    assert check_type("k", None, int | None) is None
    assert check_type("k", "all", Literal["all"] | list[int]) == "all"
    for value, hint, words in (
        ([1, "x"], list[int], r"k\[1\] must be an integer, got 'x'"),
        (True, int, "k must be an integer, got True"),
        ("some", Literal["all"] | list[int], "k must be one of 'all' or a list of integers, got 'some'"),
        (1, Literal["a", "b"], "k must be one of 'a', 'b', got 1"),
        ({"a": 1}, list[float], "k must be a list of numbers"),
    ):
        with pytest.raises(OptionError, match=words):
            check_type("k", value, hint)


def test_a_new_registry_takes_options_from_annotations():
    things = Registry("thing")

    @things.register("box")
    class Box:
        def __init__(self, side: int, colour: Literal["red", "blue"] = "red", tags: list[str] | None = None):
            self.side, self.colour, self.tags = side, colour, tags

    assert things.defaults("box") == {"colour": "red", "tags": None}
    with pytest.raises(OptionError, match="thing 'box' needs side"):
        things.validate({"name": "box"})
    box = things.build({"name": "box", "side": 2, "tags": ["a"]})
    assert (box.side, box.colour, box.tags) == (2, "red", ["a"])


def test_list_valued_mixedae_option_from_a_recipe():
    from mimkit.train import RecipeError, load_recipe

    recipe = REPO / "recipes" / "mixedae" / "vit_base_patch16_in1k.yaml"
    r = load_recipe(recipe, ["method.homologous_blocks=[0, 5, 11]"], check_data=False)
    assert r.method.options["homologous_blocks"] == [0, 5, 11]
    with pytest.raises(RecipeError, match="method.topk must be null or an integer, got 'many'"):
        load_recipe(recipe, ["method.topk=many"], check_data=False)
    with pytest.raises(RecipeError, match=r"method.backbone.depth must be an integer, got '12'"):
        load_recipe(recipe, ["method.backbone.depth='12'"], check_data=False)


def test_import_mimkit_imports_no_benchmark_code():
    code = (
        "import sys, mimkit, mimkit.train, mimkit.eval\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mimkit.bench', 'benchmarks'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_methods_share_the_masked_image_model_base():
    from torch import nn

    from mimkit.ssl.base import MaskedImageModel
    from mimkit.ssl.registry import register_method

    for name in METHODS.names():
        if name == "finetune":  # the supervised method on the same trainer: an encoder and a head, no masks
            assert not issubclass(METHODS.get(name), MaskedImageModel)
            continue
        assert issubclass(METHODS.get(name), MaskedImageModel), name
    with pytest.raises(TypeError, match="needs set_epoch"):
        register_method("no_epoch")(type("NoEpoch", (nn.Module,), {}))
    model = build_method(
        {
            "name": "mae",
            "backbone": TINY_BACKBONE,
            "mask": {"type": "colornoise", "schedule": {0: "red", 2: "blue"}},
        }
    )
    model.set_epoch(2)
    assert model.mask_generator.color == "blue"
    assert model.draw_mask(3).shape == (3, 16)
