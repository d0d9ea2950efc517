"""Building blocks of the schema: one-line problems, numeric ranges and registered names.

A check inside the schema raises :func:`problem`; :mod:`fedeq.config.translate` turns it into a
:class:`~fedeq.config.errors.ConfigError` whose key is the model's location plus ``at``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, StrictStr
from pydantic_core import PydanticCustomError

from fedeq.registry import Registry

__all__ = [
    "PROBLEM",
    "Float",
    "Int",
    "Section",
    "StrKeys",
    "check_range",
    "problem",
    "range_text",
    "registered_name",
]

#: Error type of the schema's own checks (its context carries problem, allowed, at and got).
PROBLEM = "fedeq_config"

_UNSET: Any = object()


def _integer(value: Any) -> Any:
    if isinstance(value, bool | float):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return float(value) if isinstance(value, int) else value


#: An integer: ``true`` and ``2.0`` are not integers here (``"3"`` is, as in YAML overrides).
Int = Annotated[int, BeforeValidator(_integer)]
#: A number (an integer becomes a float); ``true`` is not a number here.
Float = Annotated[float, BeforeValidator(_number)]
#: A mapping with string keys and any values.
StrKeys = dict[StrictStr, Any]


def problem(
    what: str, allowed: str, *, at: Sequence[str | int] = (), got: Any = _UNSET
) -> PydanticCustomError:
    """A problem at sub-key ``at`` of the model (or value) being validated."""
    ctx: dict[str, Any] = {"problem": what, "allowed": allowed, "at": tuple(at)}
    if got is not _UNSET:
        ctx["got"] = got
    return PydanticCustomError(PROBLEM, "{problem}", ctx)


def range_text(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> str:
    """``"a number in (0, 1]"``, ``"an integer >= 1"``, ...: the allowed text of a numeric range."""
    kind = "an integer" if integer else "a number"

    def fmt(v: float) -> str:
        return str(int(v)) if integer else f"{v:g}"

    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {fmt(high)}"
    return kind


def check_range(
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    at: Sequence[str | int] = (),
) -> None:
    """Raise an "out of range" :func:`problem` unless ``low <(=) value <(=) high`` (NaN never passes)."""
    ok = not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        allowed = range_text(low, high, low_open=low_open, high_open=high_open, integer=integer)
        raise problem("out of range", allowed, at=at, got=value)


def registered_name(registry: Registry[Any]) -> Any:
    """``Annotated[str, ...]``: a string that must be a name registered in ``registry`` at validation time."""

    def check(name: str) -> str:
        if name not in registry:
            raise problem("unknown value", registry.allowed())
        return name

    return Annotated[str, AfterValidator(check)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, use_attribute_docstrings=True)
