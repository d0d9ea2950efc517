"""Quality functions: the round context they read, the registered record, and ``register_quality``.

A quality function maps one valid reply's metrics to a score ``q >= 0``; the quality-weighted average
gives the reply the weight ``w = n · q``. Each function is registered in :data:`fedeq.registry.QUALITY`
as a :class:`QualityFunction` holding the function and the metric keys it reads (replies without them
are rejected by the reply guard).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedeq.registry import QUALITY

__all__ = ["QualityContext", "QualityFn", "QualityFunction", "quality_function", "register_quality"]


@dataclass(frozen=True)
class QualityContext:
    """Round-level information available to quality functions.

    Attributes
    ----------
    server_round : int
        Current round.
    temperature : float
        τ > 0 of the strategy.
    round_metrics : tuple[Mapping[str, float], ...]
        Metrics of every valid reply of the round (including the one being scored).
    """

    server_round: int
    temperature: float
    round_metrics: tuple[Mapping[str, Any], ...] = ()

    def max_of(self, key: str) -> float:
        """``max_j metrics_j[key]`` over the round's replies (``-inf`` if none has it)."""
        values = [float(m[key]) for m in self.round_metrics if key in m]
        return max(values) if values else -math.inf

    def min_of(self, key: str) -> float:
        """``min_j metrics_j[key]`` over the round's replies (``inf`` if none has it)."""
        values = [float(m[key]) for m in self.round_metrics if key in m]
        return min(values) if values else math.inf


QualityFn = Callable[[Mapping[str, Any], QualityContext], float]
"""``q(metrics, ctx) -> float``: the score of one reply."""


@dataclass(frozen=True)
class QualityFunction:
    """A registered quality function: ``fn`` and the metric keys it ``requires``."""

    name: str
    fn: QualityFn
    requires: tuple[str, ...] = ()

    def __call__(self, metrics: Mapping[str, Any], ctx: QualityContext) -> float:
        return self.fn(metrics, ctx)


def quality_function(name: str) -> QualityFunction:
    """The quality function registered as ``name``; ``ValueError`` listing the allowed names otherwise."""
    return QUALITY.get(name)


def register_quality(
    name: str, *, requires: Sequence[str] = (), overwrite: bool = False
) -> Callable[[QualityFn], QualityFn]:
    """Decorator registering ``fn(metrics, ctx) -> q`` under ``name`` (an identifier).

    ``requires`` lists the metric keys ``fn`` reads; replies without them are rejected.
    Registering a taken name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"quality name must be a non-empty string, got {name!r}")
    if isinstance(requires, str):
        raise ValueError(f"requires must be a sequence of metric keys, got the string {requires!r}")

    def decorator(fn: QualityFn) -> QualityFn:
        if name in QUALITY:
            if not overwrite:
                raise ValueError(f"quality function {name!r} is already registered (pass overwrite=True)")
            QUALITY.unregister(name)
        QUALITY.register(name, QualityFunction(name, fn, tuple(requires)))
        return fn

    return decorator
