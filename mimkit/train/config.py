"""Recipes: the typed schema of a pretraining run, YAML loading with overlays, and overrides.

A recipe is a YAML file with the sections of :class:`Recipe`, read over the base recipe
(``mimkit/train/base.yaml``: every key of every section but ``method``, the one source of
defaults; a method's options default to its constructor's). It may start with
``defaults: PATH`` (or a list of paths, relative to the file) naming recipes that it
overlays: mappings merge key by key, anything else replaces. Command-line overrides
``section.key=value`` (``method.backbone.img_size=64``) are applied last, their values
parsed as YAML scalars. :func:`load_recipe` checks every key, type and value and raises a
:class:`RecipeError` naming the offending key and what is allowed, before anything is built.

Derived values live on the recipe, not in the file: the learning rate
(``optim.base_lr * batch.global_size / 256`` unless ``optim.lr`` is set) and the gradient
accumulation (``batch.global_size / (batch.micro_size * world_size)``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mimkit.data.transforms import CHANNELS, Normalization
from mimkit.registry import OptionError, check_type, did_you_mean

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
LR_REFERENCE_BATCH = 256


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and what is allowed."""


# PyYAML follows YAML 1.1, which reads ``1.5e-4`` (no dot in the mantissa) as a string. Recipes
# and overrides are full of such numbers, so this loader also resolves them as floats.
class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML with ``1e-3``-style floats."""
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------------
# The schema. Every field's annotation is checked on load; ``_check_values`` adds the value rules.
# The fields have no defaults: the base recipe, loaded underneath every recipe, holds them all.

BASE_RECIPE = Path(__file__).with_name("base.yaml")


@dataclass
class MethodConfig:
    """``method``: what :func:`mimkit.ssl.build_method` receives.

    In YAML the method's own options (``decoder_dim``, ``norm_pix_loss`` ...) sit next to
    ``name``, ``backbone`` and ``mask``; here they are gathered in ``options``. Their defaults
    are the method class's; every other section's defaults are the base recipe's
    (``BASE_RECIPE``), so no dataclass here holds a value of its own.
    """

    name: str
    backbone: dict
    mask: dict | None
    options: dict

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "backbone": dict(self.backbone)}
        if self.mask is not None:
            out["mask"] = dict(self.mask)
        return {**out, **self.options}


@dataclass
class DataConfig:
    """``data``: where images come from and how they are loaded."""

    source: str
    split: str
    img_size: int | None
    channels: int | None  # 1 or 3; None follows method.backbone.in_chans (3 unless set)
    mean: list[float] | str | None  # per channel; "auto" measures the source; None: ImageNet's
    std: list[float] | str | None
    crop_scale: list[float]
    transform: str
    auto_augment: str | None  # timm policy string; read by the finetune transform only
    random_erase: float  # probability; read by the finetune transform only
    workers: int
    max_bad_fraction: float  # stop when skipped bad samples pass this share of those read


@dataclass
class OptimConfig:
    """``optim``: AdamW, its parameter groups and the warm-up + cosine learning rate."""

    base_lr: float
    lr: float | None
    min_lr: float
    warmup_epochs: float
    betas: list[float]
    eps: float
    weight_decay: float
    no_decay: list[str]
    layer_decay: float | None  # layer-wise lr decay; None: one lr for every parameter
    clip_grad: float | None


@dataclass
class BatchConfig:
    """``batch``: images per optimizer step (all ranks) and per forward pass on one rank."""

    global_size: int
    micro_size: int


@dataclass
class TrainConfig:
    """``train``: length, numerics and the DeepSpeed ZeRO stage."""

    epochs: int
    max_steps: int | None
    precision: str
    zero_stage: int
    compile: bool
    grad_checkpointing: bool
    init_from: str | None  # an exported or converted encoder loaded into method.encoder at step 0
    ema_decay: float | None  # an exponential moving average of the weights; None: none


@dataclass
class EvalConfig:
    """``eval``: the method's own evaluation on a held-out split during training (fine-tuning's top-1)."""

    source: str | None  # None: data.source
    split: str | None  # None: no evaluation
    every_epochs: int
    micro_size: int | None  # None: batch.micro_size
    best_metric: str | None  # None: keep no best checkpoint


@dataclass
class RunConfig:
    """``run``: the run directory and its bookkeeping."""

    dir: str | None
    seed: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    progress: bool
    loggers: list[str]  # beside metrics.jsonl, which is always written (mimkit.train.loggers)
    monitor: dict | None  # the online k-NN monitor (mimkit.train.monitor); None: off
    images_every: int  # steps between reconstruction pictures; 0: none


@dataclass
class DebugConfig:
    """``debug``: failure injection for the tests; all off by default."""

    nan_at_step: int | None
    kill_after_step: int | None
    kill_in_save_at_step: int | None


SECTIONS: dict[str, type] = {
    "method": MethodConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "batch": BatchConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "run": RunConfig,
    "debug": DebugConfig,
}


@dataclass
class Recipe:
    """A validated recipe. ``world_size`` is the number of ranks it was checked for."""

    method: MethodConfig
    data: DataConfig
    optim: OptimConfig
    batch: BatchConfig
    train: TrainConfig
    eval: EvalConfig
    run: RunConfig
    debug: DebugConfig
    world_size: int = 1

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.batch.global_size // (self.batch.micro_size * self.world_size)

    @property
    def lr(self) -> float:
        """Peak learning rate: ``optim.lr``, or ``optim.base_lr`` scaled by ``global_size / 256``."""
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.base_lr * self.batch.global_size / LR_REFERENCE_BATCH

    @property
    def img_size(self) -> int:
        """Image side: ``data.img_size``, else the backbone's (224 unless overridden)."""
        return self.data.img_size or self.method.backbone.get("img_size", 224)

    @property
    def channels(self) -> int:
        """Image channels: ``data.channels``, else the backbone's ``in_chans`` (3 unless overridden)."""
        return self.data.channels or self.method.backbone.get("in_chans", 3)

    @property
    def normalization(self) -> Normalization:
        """The input normalisation: ``data.mean`` / ``data.std``, ImageNet's where null.

        ``auto`` must have been resolved first (:func:`mimkit.train.trainer.resolve_auto_stats`).
        """
        default = Normalization.imagenet(self.channels)
        values = {}
        for key in ("mean", "std"):
            value = getattr(self.data, key)
            if value == "auto":
                raise RecipeError(f"data.{key}: auto is measured when training starts; not resolved yet")
            values[key] = tuple(value) if value is not None else getattr(default, key)
        return Normalization(**values)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-ready plain data, with the method options flattened back."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["method"] = self.method.to_dict()
        return out

    def dump(self) -> str:
        """The resolved recipe as YAML, headed by the values derived from it."""
        header = (
            f"# Resolved recipe (defaults and overrides applied). Derived for {self.world_size} rank(s):\n"
            f"#   lr = {self.lr:g}, gradient accumulation = {self.accumulation}, img_size = {self.img_size}\n"
        )
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int = 1,
    check_data: bool = True,
) -> Recipe:
    """Read ``path`` (with its ``defaults``), apply ``section.key=value`` overrides and validate.

    ``check_data=False`` skips the checks that look at the file system (a folder source's
    path), for reading a finished run's recipe on another machine.
    """
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    if raw.get("run", {}).get("dir") is None:
        raw.setdefault("run", {})["dir"] = str(Path("runs") / Path(path).stem)
    return from_dict(raw, world_size=world_size, check_data=check_data)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file merged over the files its ``defaults`` names (recursively)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"recipe {path} includes itself through 'defaults'")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"cannot parse recipe {path}: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("defaults", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merge key by key, other values replace."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``, the value parsed as YAML (``null``, ``1e-3``, ``[1, 2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} must look like section.key=value, e.g. optim.base_lr=1e-4")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"override {item!r}: {where} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def base_recipe() -> dict[str, Any]:
    """The base recipe's plain data: every key of every section but ``method``."""
    return read_yaml(BASE_RECIPE)


def from_dict(raw: dict[str, Any], world_size: int = 1, check_data: bool = True) -> Recipe:
    """Validate plain data (as read from YAML, over the base recipe) into a :class:`Recipe`."""
    _no_unknown(raw, list(SECTIONS), "")
    raw = deep_merge(base_recipe(), raw)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            raise RecipeError(f"{name} must be a mapping of keys, got {given!r}")
        if cls is MethodConfig:
            sections[name] = _method(given)
        else:
            sections[name] = _section(name, cls, given)
    recipe = Recipe(**sections, world_size=world_size)
    _check_values(recipe, check_data)
    if recipe.data.img_size is not None:  # one image size for the data and the backbone
        recipe.method.backbone.setdefault("img_size", recipe.data.img_size)
    if recipe.data.channels is not None:  # and one channel count
        recipe.method.backbone.setdefault("in_chans", recipe.data.channels)
    return recipe


def _no_unknown(given: dict, valid: list[str], prefix: str) -> None:
    for key in given:
        if key not in valid:
            hint = did_you_mean(str(key), valid, prefix)
            raise RecipeError(
                f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(prefix + v for v in valid)}"
            )


def _section(name: str, cls: type, given: dict) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    _no_unknown(given, valid, f"{name}.")
    try:
        values = {key: check_type(f"{name}.{key}", value, hints[key]) for key, value in given.items()}
    except OptionError as err:
        raise RecipeError(str(err)) from None
    return cls(**values)


def _method(given: dict) -> MethodConfig:
    """The ``method`` section, checked against the method, backbone and mask registries.

    Types come from the registered constructors' annotations; the mask is also built (cheap, and
    its value rules, such as a ratio in (0, 1), live in its constructor). Nothing else is built.
    """
    from mimkit.ssl import masking
    from mimkit.ssl.registry import SECTION_KEYS, method_class, validate_method

    if "name" not in given or "backbone" not in given:
        from mimkit.models import list_backbones
        from mimkit.ssl import list_methods

        raise RecipeError(
            "method needs a name and a backbone, e.g. "
            "method: {name: mae, backbone: {name: vit_base_patch16}}; "
            f"methods: {', '.join(list_methods())}; backbones: {', '.join(list_backbones())}"
        )
    try:
        typed = validate_method(given)
        if typed.get("mask") is not None:
            masking.build(typed["mask"])
    except OptionError as err:
        raise RecipeError(str(err)) from None
    except ValueError as err:
        raise RecipeError(f"method.mask: {err}") from None
    check_options = getattr(method_class(typed["name"]), "check_options", None)
    if check_options is not None:  # value rules of a method's options, stated by the method
        try:
            check_options({k: v for k, v in typed.items() if k not in SECTION_KEYS}, "method.")
        except ValueError as err:
            raise RecipeError(str(err)) from None
    backbone = typed["backbone"]
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
        value = backbone.get(key, 1)
        if isinstance(value, int) and value < 1:
            raise RecipeError(f"method.backbone.{key} must be a positive integer, got {value!r}")
    options = {k: v for k, v in typed.items() if k not in SECTION_KEYS}
    return MethodConfig(name=typed["name"], backbone=backbone, mask=typed.get("mask"), options=options)


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise RecipeError(f"{key} must be {allowed}, got {value!r}")


def _check_values(r: Recipe, check_data: bool) -> None:
    """Rules on values, and on values that depend on each other."""
    from mimkit.data import SOURCE_SCHEMES, SPLITS, TRANSFORM_KINDS
    from mimkit.eval import seg_data  # noqa: F401  registers voc: and ade20k: (painter trains on masks)
    from mimkit.finetune.transforms import FINETUNE_TRANSFORM

    o, b, t, d, run = r.optim, r.batch, r.train, r.data, r.run
    _require(o.base_lr > 0, "optim.base_lr", "a positive number", o.base_lr)
    _require(o.lr is None or o.lr > 0, "optim.lr", "a positive number or null (scale base_lr)", o.lr)
    _require(o.min_lr >= 0, "optim.min_lr", "a number >= 0", o.min_lr)
    _require(
        0 <= o.warmup_epochs <= t.epochs,
        "optim.warmup_epochs",
        f"in [0, train.epochs={t.epochs}]",
        o.warmup_epochs,
    )
    _require(
        len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas),
        "optim.betas",
        "two numbers in [0, 1)",
        o.betas,
    )
    _require(o.eps > 0, "optim.eps", "a positive number", o.eps)
    _require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    _require(
        o.layer_decay is None or 0 < o.layer_decay <= 1,
        "optim.layer_decay",
        "a factor in (0, 1] or null (off); MAE fine-tunes ViT-B at 0.65, ViT-L at 0.75",
        o.layer_decay,
    )
    _require(
        o.clip_grad is None or o.clip_grad > 0,
        "optim.clip_grad",
        "a positive max norm or null (off)",
        o.clip_grad,
    )

    _require(b.global_size >= 1, "batch.global_size", "a positive integer", b.global_size)
    _require(b.micro_size >= 1, "batch.micro_size", "a positive integer", b.micro_size)
    per_step = b.micro_size * r.world_size
    if b.global_size % per_step:
        raise RecipeError(
            f"batch.global_size={b.global_size} is not divisible by batch.micro_size x world size = "
            f"{b.micro_size} x {r.world_size} = {per_step}; pick a global size that is a multiple of "
            f"{per_step}, or a micro size (and world size) whose product divides {b.global_size}"
        )

    _require(t.epochs >= 1, "train.epochs", "a positive integer", t.epochs)
    _require(
        t.max_steps is None or t.max_steps >= 1, "train.max_steps", "a positive integer or null", t.max_steps
    )
    _require(t.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}", t.precision)
    _require(t.zero_stage in ZERO_STAGES, "train.zero_stage", "one of 0, 1, 2, 3", t.zero_stage)

    _require(run.seed >= 0, "run.seed", "an integer >= 0", run.seed)
    _require(run.log_every >= 1, "run.log_every", "a positive integer (steps)", run.log_every)
    _require(
        run.checkpoint_every >= 0,
        "run.checkpoint_every",
        "steps >= 0 (0: only at the end)",
        run.checkpoint_every,
    )
    _require(run.keep_checkpoints >= 1, "run.keep_checkpoints", "a positive integer", run.keep_checkpoints)
    _require(bool(run.dir), "run.dir", "a directory path", run.dir)
    _check_watching(r, check_data)

    _require(d.workers >= 0, "data.workers", "an integer >= 0", d.workers)
    _require(
        0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "a fraction in [0, 1]", d.max_bad_fraction
    )
    _require(d.split in SPLITS, "data.split", f"one of {', '.join(SPLITS)}", d.split)
    kinds = (*TRANSFORM_KINDS, FINETUNE_TRANSFORM)
    _require(d.transform in kinds, "data.transform", f"one of {', '.join(kinds)}", d.transform)
    scheme, sep, spec = d.source.partition(":")
    if not sep or scheme not in SOURCE_SCHEMES:
        raise RecipeError(
            f"data.source {d.source!r} has no known scheme; valid: "
            + ", ".join(f"{s}:..." for s in SOURCE_SCHEMES)
        )
    if check_data and scheme == "folder" and not Path(spec).expanduser().is_dir():
        raise RecipeError(
            f"data.source {d.source!r}: the folder {spec!r} does not exist (or is not a directory)"
        )
    index = spec.partition("?")[0]
    local_index = index.endswith(".json") and not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", index)  # not a URL
    if check_data and scheme == "wds" and local_index and not Path(index).expanduser().is_file():
        raise RecipeError(
            f"data.source {d.source!r}: the shard index {index!r} does not exist; write the shards "
            "with tools/make_shards.py SOURCE OUT_DIR (it writes OUT_DIR/train-index.json)"
        )
    _require(d.img_size is None or d.img_size >= 1, "data.img_size", "a positive integer or null", d.img_size)
    backbone_size = r.method.backbone.get("img_size")
    if d.img_size is not None and backbone_size is not None and d.img_size != backbone_size:
        raise RecipeError(
            f"data.img_size={d.img_size} differs from method.backbone.img_size={backbone_size}; "
            "set one of them (data.img_size: null follows the backbone)"
        )

    _check_image_format(r)
    _check_finetune_keys(r, check_data)

    for key in ("nan_at_step", "kill_after_step", "kill_in_save_at_step"):
        value = getattr(r.debug, key)
        _require(value is None or value >= 1, f"debug.{key}", "a step number >= 1 or null", value)


def _check_watching(r: Recipe, check_packages: bool) -> None:
    """``run.loggers`` (packages installed), ``run.monitor`` (defaults filled in), ``run.images_every``."""
    from mimkit.data import SOURCE_SCHEMES
    from mimkit.train.loggers import LOGGERS, MissingLoggerPackage, check_available
    from mimkit.train.monitor import MONITOR_DEFAULTS

    run = r.run
    for name in run.loggers:
        _require(name in LOGGERS, "run.loggers", f"a list of {', '.join(LOGGERS)}", run.loggers)
    if check_packages:
        try:
            check_available(run.loggers)
        except MissingLoggerPackage as err:
            raise RecipeError(str(err)) from None
    _require(run.images_every >= 0, "run.images_every", "steps >= 0 (0: no pictures)", run.images_every)
    if run.monitor is None:
        return
    _no_unknown(run.monitor, list(MONITOR_DEFAULTS), "run.monitor.")
    m = run.monitor = {**MONITOR_DEFAULTS, **run.monitor}
    for key in ("every", "images", "queries", "k"):
        ok = isinstance(m[key], int) and not isinstance(m[key], bool) and m[key] >= 1
        _require(ok, f"run.monitor.{key}", "a positive integer", m[key])
    _require(m["k"] <= m["images"], "run.monitor.k", f"at most run.monitor.images={m['images']}", m["k"])
    if m["source"] is None and r.data.source.startswith("wds:"):
        raise RecipeError(
            f"run.monitor.source is null, so it reads data.source {r.data.source!r}, a stream; the monitor "
            "needs an indexed labelled source: set run.monitor.source (e.g. folder:/data/imagenet-val-subset)"
        )
    if m["source"] is not None:
        scheme = str(m["source"]).partition(":")[0]
        _require(
            scheme in SOURCE_SCHEMES and scheme != "wds",
            "run.monitor.source",
            "a labelled indexed source ("
            + ", ".join(f"{s}:..." for s in SOURCE_SCHEMES if s != "wds")
            + ") or null (data.source)",
            m["source"],
        )


def _check_image_format(r: Recipe) -> None:
    """Channels that the data and the backbone agree on, normalisation per channel, a crop range."""
    d = r.data
    valid = ", ".join(map(str, CHANNELS))
    ok = d.channels is None or d.channels in CHANNELS
    _require(ok, "data.channels", f"one of {valid} or null", d.channels)
    in_chans = r.method.backbone.get("in_chans")
    if d.channels is not None and in_chans is not None and d.channels != in_chans:
        raise RecipeError(
            f"data.channels={d.channels} differs from method.backbone.in_chans={in_chans}; set one of them "
            "(data.channels: null follows the backbone, and method.backbone.in_chans follows data.channels)"
        )
    channels = r.channels
    _require(channels in CHANNELS, "method.backbone.in_chans", f"one of {valid} (image channels)", channels)
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is None or value == "auto":
            continue
        _require(
            isinstance(value, list) and len(value) == channels,
            f"data.{key}",
            f"auto, null (ImageNet's) or one number per channel ({channels}: data.channels={channels})",
            value,
        )
        if key == "std":
            _require(all(v > 0 for v in value), "data.std", "positive numbers", value)
    scale = d.crop_scale
    _require(
        len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
        "data.crop_scale",
        "two area fractions [low, high] with 0 < low <= high <= 1 (MAE: [0.2, 1.0])",
        scale,
    )


def _check_finetune_keys(r: Recipe, check_data: bool) -> None:
    """The keys fine-tuning brought: augmentation, layer decay, the initial encoder, evaluation.

    Each is generic (any method may set them); what a key needs of the method (layer decay a
    ``group_matcher``, evaluation an ``evaluate``) is asked of the method's class, not of its name.
    """
    from mimkit.data import SOURCE_SCHEMES, SPLITS
    from mimkit.finetune.transforms import check_auto_augment
    from mimkit.ssl.registry import METHODS, method_class

    d, e, t = r.data, r.eval, r.train
    _require(0 <= d.random_erase <= 1, "data.random_erase", "a probability in [0, 1]", d.random_erase)
    if d.auto_augment is not None:
        try:
            check_auto_augment(d.auto_augment)
        except ValueError as err:
            raise RecipeError(f"data.auto_augment {d.auto_augment!r}: {err}") from None

    cls = method_class(r.method.name)
    if r.optim.layer_decay is not None and not hasattr(cls, "group_matcher"):
        able = [n for n in METHODS.names() if hasattr(METHODS.get(n), "group_matcher")]
        raise RecipeError(
            f"optim.layer_decay={r.optim.layer_decay} needs a method that numbers its layers "
            f"(a group_matcher, as timm models have); method {r.method.name!r} does not. Methods that "
            f"do: {', '.join(able)}; or set optim.layer_decay=null"
        )

    if t.init_from is not None:
        _require(bool(t.init_from), "train.init_from", "a path or null", t.init_from)
        if check_data and not Path(t.init_from).expanduser().exists():
            raise RecipeError(
                f"train.init_from {t.init_from!r} does not exist; expected an encoder export or run "
                "directory (encoder.safetensors + encoder.json), one of those files, or a checkpoint file"
            )

    if t.ema_decay is not None:
        _require(0 < t.ema_decay < 1, "train.ema_decay", "a decay in (0, 1) or null (off)", t.ema_decay)
        if t.zero_stage == 3:
            raise RecipeError(
                "train.ema_decay needs every weight on every rank: train.zero_stage 0, 1 or 2, not 3"
            )

    metrics = getattr(cls, "eval_metrics", None)
    if e.source is not None:
        scheme, sep, spec = e.source.partition(":")
        if not sep or scheme not in SOURCE_SCHEMES:
            raise RecipeError(
                f"eval.source {e.source!r} has no known scheme; valid: "
                + ", ".join(f"{s}:..." for s in SOURCE_SCHEMES)
                + " (or null: data.source)"
            )
        if check_data and scheme == "folder" and not Path(spec).expanduser().is_dir():
            raise RecipeError(f"eval.source {e.source!r}: the folder {spec!r} does not exist")
    if e.split is not None:
        _require(e.split in SPLITS, "eval.split", f"one of {', '.join(SPLITS)} or null", e.split)
        if metrics is None:
            able = [n for n in METHODS.names() if getattr(METHODS.get(n), "eval_metrics", None)]
            raise RecipeError(
                f"eval.split={e.split!r}: method {r.method.name!r} has no evaluation of its own; "
                f"set eval.split=null (methods that evaluate: {', '.join(able)})"
            )
    _require(e.every_epochs >= 1, "eval.every_epochs", "a positive integer (epochs)", e.every_epochs)
    _require(
        e.micro_size is None or e.micro_size >= 1,
        "eval.micro_size",
        "a positive integer or null (batch.micro_size)",
        e.micro_size,
    )
    if e.best_metric is not None:
        if e.split is None:
            raise RecipeError(
                f"eval.best_metric={e.best_metric!r} needs eval.split (the split it is read on)"
            )
        _require(
            e.best_metric in metrics,
            "eval.best_metric",
            f"one of {', '.join(metrics)} (what method {r.method.name!r} evaluates) or null",
            e.best_metric,
        )
