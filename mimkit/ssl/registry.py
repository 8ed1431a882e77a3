"""Method registry: ``build_method(cfg)`` turns a recipe's ``method`` section into a module."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from mimkit.models import create_backbone
from mimkit.ssl import masking

_REGISTRY: dict[str, type[nn.Module]] = {}
_BUILT_BY_REGISTRY = ("encoder", "mask_generator")


def register_method(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a pretraining method under ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    """Registered method names."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")
    return _REGISTRY[name]


def method_options(name: str) -> dict[str, Any]:
    """The keyword options of a method (besides backbone and mask) and their defaults."""
    params = inspect.signature(method_class(name).__init__).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k != "self" and k not in _BUILT_BY_REGISTRY and p.kind is p.POSITIONAL_OR_KEYWORD
    }


def build_method(cfg: dict[str, Any]) -> nn.Module:
    """Build a method from a mapping like a recipe's ``method`` section.

    ``{"name": "mae", "backbone": {"name": "vit_tiny_patch16", "img_size": 64},
    "mask": {"type": "random", "ratio": 0.75}, "decoder_depth": 4}``; ``mask`` falls back to
    the method's default and every other key must be one of the method's options.
    """
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    cls = method_class(name)
    backbone_cfg = dict(cfg.pop("backbone", {}))
    if "name" not in backbone_cfg:
        raise ValueError("method.backbone needs a 'name' (one of the registered backbones)")
    mask_cfg = cfg.pop("mask", None) or getattr(cls, "default_mask", None)
    options = method_options(name)
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for method {name!r}; valid: {', '.join(options)}"
        )
    encoder = create_backbone(**backbone_cfg)
    return cls(encoder=encoder, mask_generator=masking.build(mask_cfg), **cfg)
