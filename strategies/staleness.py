"""Staleness weights and the rebasing of stale updates for buffered asynchronous aggregation (FedBuff).

A client that trained on model version ``v_i`` returns ``θ_i``; its update is ``Δ_i = θ_i − θ_{v_i}`` and its
staleness at the current version ``v`` is ``τ_i = v − v_i``. FedBuff (Nguyen et al., AISTATS 2022) applies

    θ ← θ + η_g · Σ_i p_i · s(τ_i) · Δ_i

once ``K`` updates are buffered (the paper: ``p_i = 1/K``). :func:`rebase` turns a reply into
``θ_v + η_g · s(τ_i) · Δ_i``, so that any weighted-average strategy (weights ``p_i`` summing to one)
applied to the rebased replies computes exactly this rule with its own weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord

from fedeq.arrays import record_from_numpy, record_to_numpy

__all__ = ["STALENESS_FUNCTIONS", "StalenessFn", "rebase", "staleness_weight"]

StalenessFn = Callable[[int, float], float]
"""``s(τ, a)``: the weight of an update of staleness ``τ >= 0`` (``a``: ``async.staleness_exponent``)."""

STALENESS_FUNCTIONS: dict[str, StalenessFn] = {
    "constant": lambda tau, a: 1.0,
    "polynomial": lambda tau, a: float((1.0 + tau) ** -a),
}
"""``constant``: ``s = 1``; ``polynomial``: ``s = (1 + τ)^-a`` (``a = 0.5``: FedBuff's ``1/sqrt(1 + τ)``)."""


def staleness_weight(name: str, tau: int, exponent: float = 0.5) -> float:
    """``s(τ)`` of the staleness function ``name``; raises ``ValueError`` for an unknown name or ``τ < 0``."""
    if name not in STALENESS_FUNCTIONS:
        raise ValueError(f"unknown staleness function {name!r}; allowed: {', '.join(STALENESS_FUNCTIONS)}")
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return STALENESS_FUNCTIONS[name](int(tau), float(exponent))


def rebase(
    current: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    trained: ArrayRecord,
    scale: float,
) -> ArrayRecord | None:
    """``θ_v + scale · (θ_i − θ_{v_i})`` per floating-point array (``current``: θ_v, ``start``: θ_{v_i},
    ``trained``: θ_i), computed in float64 and cast back; other arrays (integer counters) are kept as
    trained. ``None`` when the keys or shapes of ``trained`` differ from ``start`` (the reply guard rejects
    such a reply unchanged)."""
    values = record_to_numpy(trained)
    if values.keys() != start.keys() or values.keys() != current.keys():
        return None
    out: dict[str, np.ndarray] = {}
    for key, theta in values.items():
        base, origin = current[key], start[key]
        if theta.shape != origin.shape or theta.shape != base.shape:
            return None
        if not np.issubdtype(theta.dtype, np.floating) or not math.isfinite(scale):
            out[key] = theta
            continue
        delta = theta.astype(np.float64) - origin.astype(np.float64)
        out[key] = (base.astype(np.float64) + scale * delta).astype(base.dtype)
    return record_from_numpy(out)
