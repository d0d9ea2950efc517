"""Quality functions: the round context they read, the registered record, and ``register_quality``.

A quality function maps one valid reply's metrics to a score ``q >= 0``; the quality-weighted average
gives the reply the weight ``w = n · q``. Each function is registered in :data:`fedeq.registry.QUALITY`
as a :class:`QualityFunction` holding the function, the metric keys it reads (replies without them
are rejected by the reply guard) and what else it ``needs`` from the round (:data:`NEEDS`); the strategy
fills only those parts of the :class:`QualityContext`, so rules that read metrics alone stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedeq.registry import QUALITY

__all__ = [
    "NEEDS",
    "QualityContext",
    "QualityFn",
    "QualityFunction",
    "ServerEvaluate",
    "quality_function",
    "register_quality",
]

NEEDS = ("arrays", "updates", "evaluate")
"""What a quality function may need beyond the metrics: ``arrays`` (the round's global model θ and each
reply's θ_j), ``updates`` (Δ_j = θ_j − θ, floating arrays flattened to float64) and ``evaluate`` (the
server's loss on its validation split, :attr:`QualityContext.evaluate`)."""

ServerEvaluate = Callable[[ArrayRecord], float]
"""``evaluate(arrays) -> loss``: mean cross-entropy of a model on the server's validation split."""


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
    index : int | None
        Position of the reply being scored in ``round_metrics`` (set by the strategy for each reply).
    global_arrays : ArrayRecord | None
        The round's global model θ (``needs`` ``arrays``).
    reply_arrays : tuple[ArrayRecord, ...]
        θ_j of every reply, in the order of ``round_metrics`` (``needs`` ``arrays``).
    updates : tuple[np.ndarray, ...]
        Δ_j = θ_j − θ of every reply over the floating arrays, flattened in key order (``needs`` ``updates``).
    evaluate : ServerEvaluate | None
        Loss of a model on the server's validation split (``needs`` ``evaluate``).
    cache : dict
        Per-round scratch space shared by the context of every reply (e.g. the median update).
    """

    server_round: int
    temperature: float
    round_metrics: tuple[Mapping[str, Any], ...] = ()
    index: int | None = None
    global_arrays: ArrayRecord | None = None
    reply_arrays: tuple[ArrayRecord, ...] = ()
    updates: tuple[np.ndarray, ...] = ()
    evaluate: ServerEvaluate | None = None
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def max_of(self, key: str) -> float:
        """``max_j metrics_j[key]`` over the round's replies (``-inf`` if none has it)."""
        values = [float(m[key]) for m in self.round_metrics if key in m]
        return max(values) if values else -math.inf

    def min_of(self, key: str) -> float:
        """``min_j metrics_j[key]`` over the round's replies (``inf`` if none has it)."""
        values = [float(m[key]) for m in self.round_metrics if key in m]
        return min(values) if values else math.inf

    def _own(self, values: Sequence[Any], need: str) -> Any:
        if self.index is None or not 0 <= self.index < len(values):
            raise ValueError(f"no {need} of the scored reply in the context (declare needs=({need!r},))")
        return values[self.index]

    def arrays(self) -> ArrayRecord:
        """θ_i, the arrays of the reply being scored."""
        return self._own(self.reply_arrays, "arrays")

    def update(self) -> np.ndarray:
        """Δ_i = θ_i − θ of the reply being scored (flattened, float64)."""
        return self._own(self.updates, "updates")

    def median_update(self) -> np.ndarray:
        """The coordinate-wise median of the round's updates, ``median_j Δ_j`` (computed once per round)."""
        if not self.updates:
            raise ValueError("the quality context holds no updates (declare needs=('updates',))")
        if "median-update" not in self.cache:
            self.cache["median-update"] = np.median(np.stack(self.updates), axis=0)
        return self.cache["median-update"]


QualityFn = Callable[[Mapping[str, Any], QualityContext], float]
"""``q(metrics, ctx) -> float``: the score of one reply."""


@dataclass(frozen=True)
class QualityFunction:
    """A registered quality function: ``fn``, the metric keys it ``requires`` and what it ``needs``."""

    name: str
    fn: QualityFn
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()

    def __call__(self, metrics: Mapping[str, Any], ctx: QualityContext) -> float:
        return self.fn(metrics, ctx)


def quality_function(name: str) -> QualityFunction:
    """The quality function registered as ``name``; ``ValueError`` listing the allowed names otherwise."""
    return QUALITY.get(name)


def register_quality(
    name: str, *, requires: Sequence[str] = (), needs: Sequence[str] = (), overwrite: bool = False
) -> Callable[[QualityFn], QualityFn]:
    """Decorator registering ``fn(metrics, ctx) -> q`` under ``name`` (an identifier).

    ``requires`` lists the metric keys ``fn`` reads; replies without them are rejected. ``needs`` lists
    what else of the round it reads (a subset of :data:`NEEDS`). Registering a taken name raises
    ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"quality name must be a non-empty string, got {name!r}")
    if isinstance(requires, str):
        raise ValueError(f"requires must be a sequence of metric keys, got the string {requires!r}")
    if isinstance(needs, str) or not set(needs) <= set(NEEDS):
        raise ValueError(f"needs must be a sequence of {list(NEEDS)}, got {needs!r}")

    def decorator(fn: QualityFn) -> QualityFn:
        if name in QUALITY:
            if not overwrite:
                raise ValueError(f"quality function {name!r} is already registered (pass overwrite=True)")
            QUALITY.unregister(name)
        QUALITY.register(name, QualityFunction(name, fn, tuple(requires), tuple(needs)))
        return fn

    return decorator
