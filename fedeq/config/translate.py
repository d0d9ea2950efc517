"""From the schema to one-line errors: where a dotted key leads, and what is allowed there.

:func:`config_error` turns the first error of a pydantic ``ValidationError`` into a
:class:`~fedeq.config.errors.ConfigError`: its ``loc`` becomes the dotted key
(``devices.tiers[1].f_max_iter``) and the field's type and constraints become the "allowed" text.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from fedeq.config.errors import MISSING, ConfigError
from fedeq.config.rules import PROBLEM, range_text

__all__ = ["Slot", "config_error", "describe", "dotted", "slot_at"]


def dotted(loc: Sequence[str | int]) -> str:
    """``("devices", "tiers", 1, "f_max_iter")`` -> ``devices.tiers[1].f_max_iter``."""
    key = ""
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else (f"{key}.{part}" if key else str(part))
    return key


@dataclass
class Slot:
    """What the schema declares at one location: the type (``Annotated`` removed) and its constraints."""

    annotation: Any
    metadata: list[Any] = field(default_factory=list)

    @property
    def optional(self) -> bool:
        return _unwrap_optional(self.annotation)[0]

    @property
    def inner(self) -> Any:
        """The type without ``None`` and ``Annotated``."""
        return _strip(_unwrap_optional(self.annotation)[1])[0]

    @property
    def model(self) -> type[BaseModel] | None:
        inner = self.inner
        return inner if inspect.isclass(inner) and issubclass(inner, BaseModel) else None


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return tp, metadata


def _unwrap_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return True, args[0] if len(args) == 1 else Any
    return False, tp


def slot_at(root: type[BaseModel], loc: Sequence[str | int]) -> Slot | None:
    """The schema's slot at ``loc`` below ``root`` (``None`` where the schema has no such key)."""
    slot = Slot(root)
    for part in loc:
        model, inner = slot.model, slot.inner
        if model is not None:
            info = model.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return None
            annotation, extra = _strip(info.annotation)
            slot = Slot(annotation, [*info.metadata, *extra])
        elif typing.get_origin(inner) is list and isinstance(part, int):
            slot = Slot(*_strip(typing.get_args(inner)[0]))
        elif typing.get_origin(inner) is dict:
            slot = Slot(*_strip(typing.get_args(inner)[1]))
        elif inner is Any:
            slot = Slot(Any)
        else:
            return None
    return slot


_WORDS: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def describe(slot: Slot) -> str:
    """What a value at ``slot`` may be: ``"an integer"``, ``"a mapping with keys a, b"``, ..."""
    inner, model = slot.inner, slot.model
    origin = typing.get_origin(inner)
    if model is not None:
        text = "a mapping with keys " + ", ".join(model.model_fields)
    elif origin is list:
        elem = Slot(*_strip(typing.get_args(inner)[0]))
        if elem.model is not None:
            text = "a list of mappings with keys " + ", ".join(elem.model.model_fields)
        else:
            text = f"a list of {describe(elem).removeprefix('a ').removeprefix('an ')}s"
    elif origin is dict:
        text = "a mapping of string keys"
    elif origin is Literal:
        text = " | ".join(str(a) for a in typing.get_args(inner))
    else:
        text = _WORDS.get(inner, "any value")
    return f"{text} or null" if slot.optional else text


def _bounds_text(slot: Slot) -> str | None:
    low = high = None
    low_open = high_open = False
    for item in slot.metadata:
        if isinstance(item, at.Gt | at.Ge):
            low, low_open = (item.gt, True) if isinstance(item, at.Gt) else (item.ge, False)
        elif isinstance(item, at.Lt | at.Le):
            high, high_open = (item.lt, True) if isinstance(item, at.Lt) else (item.le, False)
    if low is None and high is None:
        return None
    integer = slot.inner is int
    return range_text(low, high, low_open=low_open, high_open=high_open, integer=integer)  # type: ignore[arg-type]


_EXPECTED = {"int": int, "float": float, "bool": bool, "string": str}
_CONTAINERS = {"model": "expected a mapping", "dict": "expected a mapping", "list": "expected a list"}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def config_error(exc: ValidationError, root: type[BaseModel]) -> ConfigError:
    """The first problem of ``exc`` (raised validating ``root``) as a one-line :class:`ConfigError`."""
    error = exc.errors(include_url=False)[0]
    loc, kind, got = tuple(error["loc"]), error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind == PROBLEM:
        key = dotted(loc + ctx["at"]) or "config"
        return ConfigError(key, ctx["problem"], ctx["allowed"], ctx.get("got", got))
    if loc and loc[-1] == "[key]":
        key = f"{dotted(loc[:-2])}.{loc[-2]}"
        return ConfigError(key, "mapping keys must be strings", "string keys", loc[-2])
    key = dotted(loc) or "config"
    if kind == "extra_forbidden":
        parent = slot_at(root, loc[:-1])
        fields = parent.model.model_fields if parent is not None and parent.model is not None else {}
        return ConfigError(key, "unknown key", ", ".join(fields), loc[-1])
    slot = slot_at(root, loc) or Slot(Any)
    allowed = describe(slot)
    if kind == "missing":
        return ConfigError(key, "missing mandatory value", allowed, MISSING)
    if kind == "literal_error":
        return ConfigError(key, "unknown value", allowed, got)
    if kind in _RANGE_ERRORS:
        if slot.inner is float and isinstance(got, int) and not isinstance(got, bool):
            got = float(got)
        return ConfigError(key, "out of range", _bounds_text(slot) or allowed, got)
    if got is None:
        return ConfigError(key, "null is not allowed here", allowed, got)
    family = kind.split("_", 1)[0]
    if family in _EXPECTED:
        return ConfigError(key, f"expected {_WORDS[_EXPECTED[family]]}", allowed, got)
    if family in _CONTAINERS:
        return ConfigError(key, _CONTAINERS[family], allowed, got)
    return ConfigError(key, " ".join(str(error["msg"]).split()), allowed, got)
