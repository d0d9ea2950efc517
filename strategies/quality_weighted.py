"""Quality-weighted federated averaging for DEQ clients: FedAvg with one aggregation hook overridden.

Each reply ``i`` reports ``n_i`` examples and gets a quality score ``q_i >= 0`` from a registered quality
function (:mod:`strategies.quality`).  The new global model is

    θ = Σ_i w_i θ_i / Σ_i w_i,    w_i = n_i · q_i,

accumulated in float64 and cast back to each array's dtype.  If every ``q_i`` is zero or not
finite the weights fall back to ``w_i = n_i`` (plain FedAvg).  Reply validation is not done here: the
server wraps this strategy in :class:`strategies.guard.ReplyGuard` like any other.

The :class:`~strategies.quality.QualityContext` holds the round's metrics; what the quality function
declares in ``needs`` is added: the round's global arrays (kept from ``configure_train``) and each reply's
arrays, the flattened updates Δ_j = θ_j − θ, and :attr:`QualityWeightedFedAvg.server_evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedeq.registry import QUALITY

from .aggregate import tier_metrics, weighted_average
from .quality import QualityContext, QualityFunction, ServerEvaluate
from .updates import flat_update
from .validation import records_of

__all__ = ["QualityWeightedFedAvg"]


class QualityWeightedFedAvg(FedAvg):
    """FedAvg with weights ``w_i ∝ n_i · q_i``.

    Parameters
    ----------
    quality : str (default: "residual")
        Name of a quality function registered in :data:`fedeq.registry.QUALITY`.
    temperature : float (default: 1.0)
        τ > 0 used by the exponential quality functions.
    **fedavg_kwargs
        Forwarded to :class:`flwr.serverapp.strategy.FedAvg`.

    The aggregated train MetricRecord holds FedAvg's n-weighted means, per-tier means
    (``tier<k>/<metric>``, ``tier<k>/num-clients``, ...), ``quality-mean`` (mean q_i) and
    ``quality-fallback`` (1 if the n_i fallback was used).  ``last_weights`` maps node id to the
    normalised weight w_i / Σ w_j of the latest round, ``last_quality`` to q_i. ``server_evaluate``
    (set by the server when the function needs ``evaluate``) returns a model's loss on the server's
    validation split.
    """

    def __init__(self, quality: str = "residual", temperature: float = 1.0, **fedavg_kwargs: Any) -> None:
        if not isinstance(quality, str) or quality not in QUALITY:
            allowed = sorted(QUALITY.names())
            raise ValueError(f"quality={quality!r} is not a registered quality function; allowed: {allowed}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")
        super().__init__(**fedavg_kwargs)
        self.quality = quality
        self.temperature = float(temperature)
        self.scorer: QualityFunction = QUALITY.get(quality)
        self.last_weights: dict[int, float] = {}
        self.last_quality: dict[int, float] = {}
        self.server_evaluate: ServerEvaluate | None = None
        self.round_arrays: ArrayRecord | None = None

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """The metric keys the quality function reads (the reply guard rejects replies without them)."""
        return self.scorer.requires

    @property
    def needs(self) -> tuple[str, ...]:
        """What the quality function reads beyond the metrics (``arrays``, ``updates``, ``evaluate``)."""
        return self.scorer.needs

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's round configuration; the global arrays are kept when the quality function needs them."""
        if {"arrays", "updates"} & set(self.needs):
            self.round_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregation_weights(self, server_round: int, replies: Sequence[Message]) -> Mapping[int, float]:
        """The weights of the latest aggregation (the reply guard's hook for ``clients.csv``)."""
        return self.last_weights

    def summary(self) -> None:
        """Log the quality settings, then FedAvg's summary."""
        log(INFO, "\t├──> Quality weighting: q=%s, temperature=%s", self.quality, self.temperature)
        super().summary()

    def _score(self, metrics: Mapping[str, Any], ctx: QualityContext, node_id: int) -> float:
        try:
            q = float(self.scorer(metrics, ctx))
        except Exception as err:  # noqa: BLE001 - a faulty score must not abort the round
            log(WARNING, "quality %r failed for node %s: %s; using q=0", self.quality, node_id, err)
            return 0.0
        if not math.isfinite(q) or q < 0:
            log(WARNING, "quality %r gave q=%r for node %s; using q=0", self.quality, q, node_id)
            return 0.0
        return q

    def context(
        self, server_round: int, replies: Sequence[Message], metrics: Sequence[Mapping[str, Any]]
    ) -> QualityContext:
        """The round's :class:`QualityContext`, with only what the quality function ``needs``.

        Raises ``RuntimeError`` when the function needs the global arrays and no ``configure_train``
        kept them, or needs ``evaluate`` and the server set no :attr:`server_evaluate`.
        """
        needs = set(self.needs)
        extra: dict[str, Any] = {}
        if needs & {"arrays", "updates"}:
            if self.round_arrays is None:
                raise RuntimeError(f"quality {self.quality!r} needs the global arrays (configure_train)")
            arrays = tuple(records_of(m.content, ArrayRecord)[0] for m in replies)
            extra.update(global_arrays=self.round_arrays, reply_arrays=arrays)
            if "updates" in needs:
                extra["updates"] = tuple(flat_update(a, self.round_arrays) for a in arrays)
        if "evaluate" in needs:
            if self.server_evaluate is None:
                raise RuntimeError(
                    f"quality {self.quality!r} needs a server validation split (data.server_val_fraction > 0)"
                )
            extra["evaluate"] = self.server_evaluate
        return QualityContext(server_round, self.temperature, tuple(metrics), **extra)

    def quality_weights(
        self, server_round: int, replies: Sequence[Message]
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Return ``(w, q, fallback)`` with w_i = n_i q_i, or w_i = n_i if Σ n_i q_i is not > 0."""
        metrics = [dict(records_of(m.content, MetricRecord)[0]) for m in replies]
        ctx = self.context(server_round, replies, metrics)
        n = np.array([float(m[self.weighted_by_key]) for m in metrics])
        q = np.array(
            [
                self._score(m, replace(ctx, index=i), int(r.metadata.src_node_id))
                for i, (m, r) in enumerate(zip(metrics, replies, strict=True))
            ]
        )
        w = n * q
        total = float(w.sum())
        if math.isfinite(total) and total > 0:
            return w, q, False
        log(WARNING, "quality %r: all q_i are 0/invalid in round %s; using n_i", self.quality, server_round)
        return n, q, True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Quality-weighted average of the replies with content (error replies are skipped), plus per-tier
        metrics."""
        valid = [m for m in replies if m.has_content()]
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        weights, q, fallback = self.quality_weights(server_round, valid)
        arrays = weighted_average([records_of(c, ArrayRecord)[0] for c in contents], weights.tolist())
        total = float(weights.sum())
        nodes = [int(r.metadata.src_node_id) for r in valid]
        self.last_weights = {node: float(wi / total) for node, wi in zip(nodes, weights, strict=True)}
        self.last_quality = {node: float(qi) for node, qi in zip(nodes, q, strict=True)}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        per_reply = [dict(records_of(c, MetricRecord)[0]) for c in contents]
        per_tier = tier_metrics(per_reply, self.weighted_by_key, extra={"quality": q.tolist()})
        for key, value in per_tier.items():
            metrics[key] = value
        metrics["quality-mean"] = float(q.mean())
        metrics["quality-fallback"] = int(fallback)
        self.round_arrays = None  # not kept in checkpoints
        return arrays, metrics
