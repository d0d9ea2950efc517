"""Quality-weighted federated averaging for DEQ clients.

Each valid reply ``i`` reports ``n_i`` examples and a quality score ``q_i >= 0`` computed by a
registered quality function from its metrics.  The new global model is

    θ = Σ_i w_i θ_i / Σ_i w_i,    w_i = n_i · q_i,

accumulated in float64 and cast back to each array's dtype.  If every ``q_i`` is zero or not
finite the weights fall back to ``w_i = n_i`` (plain FedAvg).

Built-in quality functions (τ = ``temperature``):

* ``residual``: q = exp(-r/τ), r = ``fp-residual`` (mean relative fixed-point residual)
* ``budget``:   q = K_i / max_j K_j, K = ``budget`` (forward iteration budget of the tier)
* ``val_loss``: q = exp(-ℓ/τ), ℓ = ``val-loss``
* ``uniform``:  q = 1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

from fedeq.registry import QUALITY
from fedeq.arrays import from_numpy, to_numpy

from .guard import ReplyGuard, records_of

__all__ = [
    "QUALITY_FUNCTIONS",
    "QUALITY_REQUIREMENTS",
    "QualityContext",
    "QualityFn",
    "QualityWeightedFedAvg",
    "register_quality",
    "tier_metrics",
    "weighted_average",
]


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

#: name -> quality function ``q(metrics, ctx) -> float``.
QUALITY_FUNCTIONS: dict[str, QualityFn] = {}
#: name -> metric keys the quality function reads (replies lacking them are rejected).
QUALITY_REQUIREMENTS: dict[str, tuple[str, ...]] = {}


def register_quality(
    name: str, *, requires: Sequence[str] = (), overwrite: bool = False
) -> Callable[[QualityFn], QualityFn]:
    """Decorator registering ``fn(metrics, ctx) -> q`` under ``name``.

    ``requires`` lists the metric keys ``fn`` reads; replies without them are rejected.
    Re-registering an existing name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"quality name must be a non-empty string, got {name!r}")

    def decorator(fn: QualityFn) -> QualityFn:
        if name in QUALITY_FUNCTIONS and not overwrite:
            raise ValueError(f"quality function {name!r} is already registered (pass overwrite=True)")
        QUALITY_FUNCTIONS[name] = fn
        QUALITY.register(name, fn) if name not in QUALITY else None
        QUALITY_REQUIREMENTS[name] = tuple(requires)
        return fn

    return decorator


@register_quality("residual", requires=("fp-residual",))
def residual_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = exp(-r/τ) with r the mean relative fixed-point residual."""
    return math.exp(-float(metrics["fp-residual"]) / ctx.temperature)


@register_quality("budget", requires=("budget",))
def budget_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = K_i / K_max, K the tier's forward iteration budget (0 if K_max <= 0)."""
    k_max = ctx.max_of("budget")
    return float(metrics["budget"]) / k_max if k_max > 0 else 0.0


@register_quality("val_loss", requires=("val-loss",))
def val_loss_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = exp(-ℓ/τ) with ℓ the client's validation loss."""
    return math.exp(-float(metrics["val-loss"]) / ctx.temperature)


@register_quality("uniform")
def uniform_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = 1 (plain FedAvg weights w_i = n_i)."""
    return 1.0


def weighted_average(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    """θ = Σ_i w_i θ_i / Σ_i w_i per array key (float64 accumulation, original dtype kept).

    Integer and bool arrays are rounded to the nearest value before the cast.  Raises
    ``ValueError`` if the inputs are empty, mismatched, or Σ w_i is not positive and finite.
    """
    if not records or len(records) != len(weights):
        raise ValueError(f"need one weight per record, got {len(records)} records and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if not (math.isfinite(total) and total > 0 and np.all(w >= 0)):
        raise ValueError(f"weights must be non-negative with a positive finite sum, got {w.tolist()}")
    out: dict[str, Array] = {}
    for key in records[0].keys():
        first = to_numpy(records[0][key])
        acc_dtype = np.complex128 if first.dtype.kind == "c" else np.float64
        acc = np.zeros(first.shape, dtype=acc_dtype)
        for i, (record, wi) in enumerate(zip(records, w, strict=True)):
            values = first if i == 0 else to_numpy(record[key])  # the first record is decoded already
            acc += wi * values.astype(acc_dtype)
        acc /= total
        if first.dtype.kind in "iub":
            acc = np.rint(acc.real)
        out[key] = from_numpy(np.asarray(acc.astype(first.dtype)))
    return ArrayRecord(out)


def _tier_label(value: Any) -> str:
    f = float(value)
    return str(int(f)) if f.is_integer() else repr(f)


def tier_metrics(
    metrics: Sequence[Mapping[str, Any]],
    weight_key: str = "num-examples",
    tier_key: str = "tier",
    extra: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, float | int]:
    """Per-tier example-weighted means ``tier<k>/<metric> = Σ n_i m_i / Σ n_i`` over tier k.

    Also reports ``tier<k>/num-clients`` and ``tier<k>/num-examples``.  ``extra`` adds per-reply
    values (e.g. ``{"quality": [...]}``) that are averaged the same way.  Replies without
    ``tier_key`` are skipped.
    """
    extra = extra or {}
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(metrics):
        if tier_key in m and not isinstance(m[tier_key], list):
            groups.setdefault(_tier_label(m[tier_key]), []).append(i)
    out: dict[str, float | int] = {}
    for label in sorted(groups, key=lambda s: float(s)):
        idx = groups[label]
        n = np.array([float(metrics[i][weight_key]) for i in idx])
        prefix = f"tier{label}/"
        out[prefix + "num-clients"] = len(idx)
        out[prefix + "num-examples"] = int(n.sum()) if float(n.sum()).is_integer() else float(n.sum())
        keys = [
            k
            for k, v in metrics[idx[0]].items()
            if k not in (weight_key, tier_key) and isinstance(v, int | float)
        ]
        for key in keys:
            if all(key in metrics[i] and isinstance(metrics[i][key], int | float) for i in idx):
                values = np.array([float(metrics[i][key]) for i in idx])
                out[prefix + key] = float(np.dot(n, values) / n.sum())
        for key, per_reply in extra.items():
            values = np.array([float(per_reply[i]) for i in idx])
            out[prefix + key] = float(np.dot(n, values) / n.sum())
    return out


class QualityWeightedFedAvg(ReplyGuard, FedAvg):
    """FedAvg with weights ``w_i ∝ n_i · q_i`` and a reply guard.

    Parameters
    ----------
    quality : str (default: "residual")
        Name of a function in ``QUALITY_FUNCTIONS``.
    temperature : float (default: 1.0)
        τ > 0 used by the exponential quality functions.
    **fedavg_kwargs
        Forwarded to :class:`ReplyGuard` / :class:`flwr.serverapp.strategy.FedAvg`.

    The aggregated train MetricRecord holds FedAvg's n-weighted means, per-tier means
    (``tier<k>/<metric>``, ``tier<k>/num-clients``, ...), ``quality-mean`` (mean q_i) and
    ``quality-fallback`` (1 if the n_i fallback was used).  ``last_weights`` maps node id to the
    normalised weight w_i / Σ w_j of the latest round.
    """

    def __init__(self, quality: str = "residual", temperature: float = 1.0, **fedavg_kwargs: Any) -> None:
        if quality not in QUALITY_FUNCTIONS:
            raise ValueError(
                f"quality={quality!r} is not a registered quality function; "
                f"allowed: {sorted(QUALITY_FUNCTIONS)}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")
        super().__init__(**fedavg_kwargs)
        self.quality = quality
        self.temperature = float(temperature)
        self.quality_fn: QualityFn = QUALITY_FUNCTIONS[quality]
        self.required_metrics = tuple(dict.fromkeys((*self.required_metrics, *QUALITY_REQUIREMENTS[quality])))
        self.last_weights: dict[int, float] = {}
        self.last_quality: dict[int, float] = {}

    def summary(self) -> None:
        """Log the quality settings, then FedAvg's summary."""
        log(INFO, "\t├──> Quality weighting: q=%s, temperature=%s", self.quality, self.temperature)
        super().summary()

    def _score(self, metrics: Mapping[str, Any], ctx: QualityContext, node_id: int) -> float:
        try:
            q = float(self.quality_fn(metrics, ctx))
        except Exception as err:  # noqa: BLE001 - a faulty score must not abort the round
            log(WARNING, "quality %r failed for node %s: %s; using q=0", self.quality, node_id, err)
            return 0.0
        if not math.isfinite(q) or q < 0:
            log(WARNING, "quality %r gave q=%r for node %s; using q=0", self.quality, q, node_id)
            return 0.0
        return q

    def quality_weights(
        self, server_round: int, replies: Sequence[Message]
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Return ``(w, q, fallback)`` with w_i = n_i q_i, or w_i = n_i if Σ n_i q_i is not > 0."""
        metrics = [dict(records_of(m.content, MetricRecord)[0]) for m in replies]
        ctx = QualityContext(server_round, self.temperature, tuple(metrics))
        n = np.array([float(m[self.weighted_by_key]) for m in metrics])
        q = np.array(
            [self._score(m, ctx, int(r.metadata.src_node_id)) for m, r in zip(metrics, replies, strict=True)]
        )
        w = n * q
        total = float(w.sum())
        if math.isfinite(total) and total > 0:
            return w, q, False
        log(WARNING, "quality %r: all q_i are 0/invalid in round %s; using n_i", self.quality, server_round)
        return n, q, True

    def aggregate_valid_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Quality-weighted average of validated replies plus per-tier metrics."""
        contents = [m.content for m in replies]
        weights, q, fallback = self.quality_weights(server_round, replies)
        arrays = weighted_average([records_of(c, ArrayRecord)[0] for c in contents], weights.tolist())
        total = float(weights.sum())
        nodes = [int(r.metadata.src_node_id) for r in replies]
        self.last_weights = {node: float(wi / total) for node, wi in zip(nodes, weights, strict=True)}
        self.last_quality = {node: float(qi) for node, qi in zip(nodes, q, strict=True)}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        per_reply = [dict(records_of(c, MetricRecord)[0]) for c in contents]
        per_tier = tier_metrics(per_reply, self.weighted_by_key, extra={"quality": q.tolist()})
        for key, value in per_tier.items():
            metrics[key] = value
        metrics["quality-mean"] = float(q.mean())
        metrics["quality-fallback"] = int(fallback)
        return arrays, metrics
