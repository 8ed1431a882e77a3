"""Build a data source from its URI-like name, as recipes and tools write it.

- ``synthetic:NAME[?key=value&...]``: an embedded synthetic set, e.g.
  ``synthetic:shapes?size=64&train=8192&val=1024&seed=0``; the options are the set's keyword
  arguments (for ``shapes``: ``size=64``, ``train=10000``, ``val=1000``, ``seed=0``, ``cache=0``,
  ``segmentation=1``; ``textures`` takes the same and ``objects=1``).
- ``folder:PATH``: an image folder, optionally with ``train/`` and ``val/``: class folders
  (``PATH/<class>/<image>``) give labels, images directly in PATH are read without labels (see
  :mod:`mimkit.data.folder`).

A scheme is a function ``(spec, split, transform) -> Dataset`` registered in :data:`SOURCE_SCHEMES`
with :func:`register_scheme`; webdataset shards (``wds:``, :mod:`mimkit.data.wds`) plug in the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from urllib.parse import parse_qsl

from torch.utils.data import Dataset

from mimkit.data.folder import ImageFolderSource
from mimkit.data.sample import Transform, check_split
from mimkit.data.synthetic import SYNTHETIC_SETS
from mimkit.registry import Registry

SchemeBuilder = Callable[[str, str, Transform | None], Dataset]

SCHEMES: Registry[Dataset] = Registry("source scheme")
SOURCE_SCHEMES: dict[str, SchemeBuilder] = SCHEMES.entries  # name -> builder


def register_scheme(name: str) -> Callable[[SchemeBuilder], SchemeBuilder]:
    """Decorator registering a builder ``(spec, split, transform) -> Dataset`` for ``name:spec`` URIs."""
    return SCHEMES.register(name)


def build_source(uri: str, split: str = "train", transform: Transform | None = None) -> Dataset:
    """The dataset named by ``uri`` for ``split`` ("train" or "val"), yielding transformed sample dicts."""
    scheme, sep, spec = uri.partition(":")
    if not sep or scheme not in SOURCE_SCHEMES:
        raise ValueError(
            f"unknown source scheme {scheme!r} in {uri!r}; valid schemes: "
            + ", ".join(f"{s}:" for s in SOURCE_SCHEMES)
        )
    check_split(split)
    return SOURCE_SCHEMES[scheme](spec, split, transform)


def _options(cls: type) -> dict[str, int]:
    """A synthetic set's URI options: its keyword-only constructor arguments and their defaults."""
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "transform"}


@register_scheme("synthetic")
def _synthetic(spec: str, split: str, transform: Transform | None) -> Dataset:
    name, _, query = spec.partition("?")
    if name not in SYNTHETIC_SETS:
        raise ValueError(f"unknown synthetic set {name!r}; valid sets: {', '.join(SYNTHETIC_SETS)}")
    cls = SYNTHETIC_SETS[name]
    defaults = _options(cls)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as err:
        raise ValueError(f"cannot parse the options {query!r} of synthetic:{name}: {err}") from err
    options = {}
    for key, value in pairs:
        if key not in defaults:
            raise ValueError(
                f"unknown option {key!r} for synthetic:{name}; valid options: "
                + ", ".join(f"{k} (default {v})" for k, v in defaults.items())
            )
        if key in options:
            raise ValueError(f"option {key!r} is given twice for synthetic:{name}")
        kind = type(defaults[key])
        try:
            options[key] = kind(value)
        except ValueError as err:
            raise ValueError(
                f"option {key}={value!r} of synthetic:{name} is not a valid {kind.__name__}"
            ) from err
    return cls(split, transform=transform, **options)


@register_scheme("folder")
def _folder(spec: str, split: str, transform: Transform | None) -> Dataset:
    if not spec:
        raise ValueError("folder: needs a path, e.g. folder:/data/imagenet")
    return ImageFolderSource(spec, split, transform)


# "wds" (webdataset tar shards, e.g. wds:/data/train-{000000..000127}.tar) registers in mimkit.data.wds.
