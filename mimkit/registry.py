"""One registry shape for everything a recipe names: backbones, methods, masks, targets, data schemes.

A :class:`Registry` is a dict of named entries (classes or factory functions) filled by a
decorator. An entry's options are its constructor's keyword parameters, typed by their
annotations, so a recipe entry is checked in one place (:meth:`Registry.validate`: unknown keys
with "did you mean", types from annotations, including lists, optionals and literals) before
anything is built, and a new entry needs no hand-written type checks; constraints between values
(a batch divisible by a group size) stay in the entry, with their own messages::

    MASKS = Registry("mask type", key="type")

    @MASKS.register("random")
    class RandomMasking(MaskGenerator):
        def __init__(self, ratio: float = 0.75): ...

    MASKS.validate({"type": "random", "ratio": "high"})  # ValueError: ratio must be a number, got 'high'
    MASKS.build({"type": "random", "ratio": 0.6})
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
REQUIRED = inspect.Parameter.empty


class OptionError(ValueError):
    """A registry entry's option that is unknown, missing or of the wrong type; the message names it."""


@dataclass(frozen=True)
class Option:
    """One keyword option of an entry: its annotation and default (``REQUIRED`` if it has none)."""

    name: str
    annotation: Any
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def did_you_mean(key: str, valid: list[str], prefix: str = "") -> str:
    """`` (did you mean PREFIX+closest?)`` for a misspelt key, else an empty string."""
    close = difflib.get_close_matches(str(key), valid, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def describe(hint: Any) -> str:
    """An annotation in words, for error messages (``a list of integers``, ``null or a number``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        inner = args[0] if args else Any
        return f"a list of {_plural(describe(inner))}"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    return words.get(hint, f"a {getattr(hint, '__name__', str(hint))}")


def _plural(words: str) -> str:
    for article in ("an ", "a "):
        if words.startswith(article):
            return words[len(article) :] + "s"
    return words


def check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (ints widen to floats; tuples become lists).

    Raises :class:`OptionError` naming ``key``, what it must be and what it got. Annotations that
    are not plain data (a module, ``Any``, none at all) accept anything.
    """
    if hint is REQUIRED or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    mismatch = OptionError(f"{key} must be {describe(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check_type(key, value, option)
            except OptionError:
                continue
        raise mismatch
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise mismatch
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise mismatch
        inner = args[0] if args else Any
        return [check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise mismatch
        return dict(value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise mismatch
    if hint is int and isinstance(value, bool):
        raise mismatch
    if isinstance(hint, type) and not isinstance(value, hint):
        raise mismatch
    return value


def signature_options(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, Option]:
    """The keyword options of ``fn`` (a class's constructor or a function) with resolved annotations."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that names something not importable here: leave those unchecked
        hints = {}
    options = {}
    for name, param in inspect.signature(target).parameters.items():
        if name in ("self", *skip) or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        options[name] = Option(name, hints.get(name, REQUIRED), param.default)
    return options


class Registry(Generic[T]):
    """Named entries of one kind, registered by decorator, validated and built from mappings.

    Args:
        kind: what the entries are, for messages ("backbone", "method", "mask type").
        key: the mapping key that names the entry (``name`` or ``type``).
        injected: constructor parameters the caller supplies rather than the recipe
            (a method's ``encoder``), left out of :meth:`options`.
    """

    def __init__(self, kind: str, key: str = "name", injected: tuple[str, ...] = ()):
        self.kind, self.key, self.injected = kind, key, injected
        self._entries: dict[str, Callable[..., T]] = {}
        self._options: dict[str, Callable | None] = {}

    def register(self, name: str | None = None, *, options: Callable | None = None):
        """Decorator registering a class or factory under ``name`` (default: its ``__name__``).

        ``options`` is a callable whose signature lists the entry's options when the entry's own
        signature does not (a factory taking ``**overrides``). A name can be registered once.
        """

        def wrap(entry: Callable[..., T]) -> Callable[..., T]:
            key = name or entry.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = entry
            self._options[key] = options
            return entry

        return wrap

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    @property
    def entries(self) -> dict[str, Callable[..., T]]:
        """The underlying name -> entry dict (the registry's own, not a copy)."""
        return self._entries

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: Any, where: str = "") -> Callable[..., T]:
        """The entry ``name``; an unknown name is an error listing the valid ones."""
        if name not in self._entries:
            label = f"{where}{self.key} " if where else ""
            hint = did_you_mean(str(name), self.names())
            raise OptionError(
                f"{label}{name!r} is not a registered {self.kind}{hint}; valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def options(self, name: str) -> dict[str, Option]:
        """The entry's options: name -> :class:`Option` (annotation and default)."""
        entry = self.get(name)
        return signature_options(self._options[name] or entry, self.injected)

    def defaults(self, name: str) -> dict[str, Any]:
        """The options that have a default, with it."""
        return {k: o.default for k, o in self.options(name).items() if not o.required}

    def validate(self, cfg: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """``cfg`` (``{key: name, option: value, ...}``) checked and typed, without building anything.

        ``where`` prefixes key names in messages (``"method.mask."``). Returns the typed mapping.
        """
        if not isinstance(cfg, Mapping) or self.key not in cfg:
            raise OptionError(f"{where or self.kind} must be a mapping with a {self.key!r}, got {cfg!r}")
        name = cfg[self.key]
        self.get(name, where)
        options = self.options(name)
        valid = list(options)
        out = {self.key: name}
        for key, value in cfg.items():
            if key == self.key:
                continue
            if key not in options:
                raise OptionError(
                    f"unknown key {where}{key}{did_you_mean(key, valid, where)} for {self.kind} {name!r}; "
                    f"valid: {', '.join(where + v for v in valid) or '(none)'}"
                )
            out[key] = check_type(f"{where}{key}", value, options[key].annotation)
        missing = [k for k, o in options.items() if o.required and k not in out]
        if missing:
            raise OptionError(f"{self.kind} {name!r} needs {', '.join(where + k for k in missing)}")
        return out

    def build(self, cfg: Mapping[str, Any], where: str = "", **injected: Any) -> T:
        """Validate ``cfg`` and call the entry with its options plus ``injected`` keyword arguments."""
        typed = self.validate(cfg, where)
        name = typed.pop(self.key)
        return self._entries[name](**typed, **injected)
