"""Method registry: ``build_method(cfg)`` turns a recipe's ``method`` section into a module.

A method section is ``{"name": ..., "backbone": {...}, "mask": {...}, **options}``: the backbone
and the mask are entries of their own registries, the options are the method constructor's
keyword parameters, typed by their annotations (:mod:`mimkit.registry`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from mimkit.models import create_backbone
from mimkit.models.backbone import BACKBONES
from mimkit.registry import Option, OptionError, Registry
from mimkit.ssl import masking

METHODS: Registry[nn.Module] = Registry("method", key="name", injected=("encoder", "mask_generator"))
SECTION_KEYS = ("name", "backbone", "mask")


def register_method(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a pretraining method under ``name``.

    A method is a module with ``set_epoch(epoch)`` (the trainer calls it every epoch), usually a
    :class:`~mimkit.ssl.base.MaskedImageModel`.
    """

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if not callable(getattr(cls, "set_epoch", None)):
            raise TypeError(
                f"method {name!r} ({cls.__name__}) needs set_epoch(epoch); subclass MaskedImageModel"
            )
        return METHODS.register(name)(cls)

    return wrap


def list_methods() -> list[str]:
    """Registered method names."""
    return METHODS.names()


def method_class(name: str) -> type[nn.Module]:
    return METHODS.get(name)


def method_options(name: str) -> dict[str, Any]:
    """The keyword options of a method (besides backbone and mask) and their defaults."""
    return METHODS.defaults(name)


def method_option_types(name: str) -> dict[str, Option]:
    """The keyword options of a method with their annotations (:class:`mimkit.registry.Option`)."""
    return METHODS.options(name)


def validate_method(cfg: dict[str, Any], where: str = "method.") -> dict[str, Any]:
    """A ``method`` mapping checked and typed (name, backbone, mask and options) without building.

    Raises :class:`~mimkit.registry.OptionError` naming the key (``method.backbone.depth``).
    """
    cfg = dict(cfg)
    name = cfg.get("name", "mae")
    backbone = cfg.pop("backbone", None)
    mask = cfg.pop("mask", None)
    typed = METHODS.validate({**cfg, "name": name}, where)
    if not isinstance(backbone, dict) or "name" not in backbone:
        raise OptionError(f"{where}backbone must be a mapping with a 'name'; got {backbone!r}")
    typed["backbone"] = BACKBONES.validate(backbone, f"{where}backbone.")
    if mask is not None:
        if not takes_mask(METHODS.get(name)):
            raise OptionError(f"{where}mask: method {name!r} masks nothing; remove the mask entry")
        if not isinstance(mask, dict):
            raise OptionError(
                f"{where}mask must be a mapping like {{type: random, ratio: 0.75}}, got {mask!r}"
            )
        typed["mask"] = masking.MASKS.validate(mask, f"{where}mask.")
    return typed


def build_method(cfg: dict[str, Any]) -> nn.Module:
    """Build a method from a mapping like a recipe's ``method`` section.

    ``{"name": "mae", "backbone": {"name": "vit_tiny_patch16", "img_size": 64},
    "mask": {"type": "random", "ratio": 0.75}, "decoder_depth": 4}``; ``mask`` falls back to
    the method's default and every other key must be one of the method's options.
    """
    if "name" not in cfg:
        raise OptionError(f"a method mapping needs a 'name'; valid: {', '.join(list_methods())}")
    typed = validate_method(cfg, "")
    backbone, mask = typed.pop("backbone"), typed.pop("mask", None)
    cls = METHODS.get(typed["name"])
    injected: dict[str, Any] = {"encoder": create_backbone(**backbone)}
    if takes_mask(cls):
        injected["mask_generator"] = masking.build(mask or cls.default_mask)
    return METHODS.build(typed, **injected)


def takes_mask(cls: type[nn.Module]) -> bool:
    """Whether a method draws masks (its constructor takes a ``mask_generator``); fine-tuning does not."""
    return "mask_generator" in inspect.signature(cls.__init__).parameters
