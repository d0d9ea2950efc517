"""FedNova-style normalised averaging: each update is divided by the client's amount of local work.

With the round's global model θ, client updates Δ_i = θ_i − θ, weights p_i = n_i / Σ_j n_j and work τ_i,

    θ_new = θ + τ_eff · Σ_i p_i Δ_i / τ_i,    τ_eff = Σ_i p_i τ_i,

per floating array, accumulated in float64 and cast back. With equal work (τ_i = τ) this is FedAvg,
Σ_i p_i θ_i. The work measure ``work`` is

* ``steps``: τ_i = ``local-steps`` (local optimizer steps; the paper's τ_i for plain local SGD);
* ``nfe``:   τ_i = ``local-steps`` · (``nfe-fwd`` + ``nfe-bwd``), the function evaluations of f and
  vector-Jacobian products spent on fixed points.

Written as a combination of the models, θ_new = (1 − Σ_i c_i) θ + Σ_i c_i θ_i with c_i = p_i τ_eff / τ_i;
``aggregation_weights`` reports c_i (the guard normalises them to c_i / Σ_j c_j for ``clients.csv``).
Σ_i c_i = (Σ p_i τ_i)(Σ p_i / τ_i) >= 1, with equality iff all τ_i are equal. Replies with τ_i <= 0
are not aggregated. Non-floating arrays (counters) get Σ_i p_i θ_i, rounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregate import tier_metrics
from .updates import normalized_average
from .validation import records_of

__all__ = ["WORK_MEASURES", "FedNova", "local_work"]

WORK_MEASURES: dict[str, tuple[str, ...]] = {
    "steps": ("local-steps",),
    "nfe": ("local-steps", "nfe-fwd", "nfe-bwd"),
}
"""Work measure -> the reply metrics it reads."""


def local_work(metrics: Mapping[str, Any], work: str) -> float:
    """τ_i of one reply: ``local-steps`` (``steps``) or ``local-steps · (nfe-fwd + nfe-bwd)`` (``nfe``)."""
    steps = float(metrics["local-steps"])
    if work == "steps":
        return steps
    return steps * (float(metrics["nfe-fwd"]) + float(metrics["nfe-bwd"]))


class FedNova(FedAvg):
    """Normalised averaging by local work, ``θ + τ_eff Σ_i p_i Δ_i / τ_i``.

    Parameters
    ----------
    work : str (default: "steps")
        The work measure τ_i: ``steps`` or ``nfe`` (see the module docstring).
    **fedavg_kwargs
        Forwarded to :class:`flwr.serverapp.strategy.FedAvg`.

    The aggregated train MetricRecord holds FedAvg's n-weighted means, per-tier means, ``fednova-tau-eff``
    (τ_eff) and ``fednova-coef-sum`` (Σ_i c_i). ``last_weights`` maps node id to c_i of the latest round.
    """

    def __init__(self, work: str = "steps", **fedavg_kwargs: Any) -> None:
        if work not in WORK_MEASURES:
            raise ValueError(f"work={work!r} is not a work measure; allowed: {sorted(WORK_MEASURES)}")
        super().__init__(**fedavg_kwargs)
        self.work = work
        self.round_arrays: ArrayRecord | None = None
        self.last_weights: dict[int, float] = {}

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """The metric keys the work measure reads (the reply guard rejects replies without them)."""
        return WORK_MEASURES[self.work]

    def summary(self) -> None:
        """Log the work measure, then FedAvg's summary."""
        log(INFO, "\t├──> FedNova: work=%s", self.work)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the round's global arrays θ, then configure the round as FedAvg."""
        self.round_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregation_weights(self, server_round: int, replies: Sequence[Message]) -> Mapping[int, float]:
        """c_i = p_i τ_eff / τ_i of the latest aggregation (the reply guard's hook for ``clients.csv``)."""
        return self.last_weights

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Normalised average of the replies with content and positive work, plus per-tier metrics.

        Raises ``RuntimeError`` when no ``configure_train`` kept the round's global arrays.
        """
        if self.round_arrays is None:
            raise RuntimeError("FedNova needs the round's global arrays: call configure_train first")
        valid = [m for m in replies if m.has_content()]
        metrics = [dict(records_of(m.content, MetricRecord)[0]) for m in valid]
        tau = [local_work(m, self.work) for m in metrics]
        kept = [i for i, t in enumerate(tau) if math.isfinite(t) and t > 0]
        for i in sorted(set(range(len(valid))) - set(kept)):
            node = int(valid[i].metadata.src_node_id)
            log(WARNING, "FedNova: reply of node %s has work %r <= 0; not aggregated", node, tau[i])
        self.last_weights = {}
        if not kept:
            return None, None
        n = np.array([float(metrics[i][self.weighted_by_key]) for i in kept])
        p = n / n.sum()
        t = np.array([tau[i] for i in kept])
        records = [records_of(valid[i].content, ArrayRecord)[0] for i in kept]
        arrays = normalized_average(self.round_arrays, records, p.tolist(), t.tolist())
        tau_eff = float(np.dot(p, t))
        coef = p * tau_eff / t
        nodes = [int(valid[i].metadata.src_node_id) for i in kept]
        self.last_weights = {node: float(c) for node, c in zip(nodes, coef, strict=True)}
        contents = [valid[i].content for i in kept]
        out = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        for key, value in tier_metrics([metrics[i] for i in kept], self.weighted_by_key).items():
            out[key] = value
        out["fednova-tau-eff"] = tau_eff
        out["fednova-coef-sum"] = float(coef.sum())
        self.round_arrays = None  # not kept in checkpoints
        return arrays, out
