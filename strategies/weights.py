"""The normalised aggregation weight of each accepted reply, for ``clients.csv``.

A strategy reports its own weights through the hook :class:`ReportsWeights`: a method
``aggregation_weights(server_round, replies) -> {node_id: weight}``, called by the reply guard right after
the strategy's ``aggregate_train`` with the replies it aggregated. Without the hook, :func:`rule_weights`
applies the rule of the Flower strategy the class derives from (the nearest one in the list below), computed
before the aggregation (some strategies consume the replies' arrays):

- FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad: ``n_i / Σ n_j`` (``weighted_by_key``; the server
  optimisers step towards this average);
- MultiKrum, Krum: ``n_i / Σ n_j`` over the selected replies, 0 for the others;
- Bulyan: ``1 / θ`` for the θ selected replies, 0 for the others;
- FedMedian, FedTrimmedAvg: ``1 / k`` (coordinate-wise, unweighted statistics);
- QFedAvg: ``(F_i + 1e-10)^q / Σ_j (F_j + 1e-10)^q`` (F: the train loss), each update's share in the step.

A wrapper that holds the strategy it wraps in ``.strategy`` (Flower's DP wrappers) reports the wrapped
strategy's weights. Any other strategy reports none (the ``weight`` column stays empty). The fallback assumes
that a subclass aggregates like its Flower base class: a subclass that changes the weighting implements the
hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, MultiKrum, QFedAvg, Strategy
from flwr.serverapp.strategy.multikrum import select_multikrum

from .validation import records_of

__all__ = ["ReportsWeights", "normalise", "rule_weights", "weight_reporter"]

Weights = dict[int, float]


@runtime_checkable
class ReportsWeights(Protocol):
    """The hook of a strategy that reports the weights it aggregated with."""

    def aggregation_weights(self, server_round: int, replies: Sequence[Message]) -> Mapping[int, float]:
        """``{node_id: w_i}`` for ``replies`` (the accepted replies of the round, as aggregated); the guard
        normalises them to sum to 1, and a node left out gets 0."""
        ...


def normalise(weights: Mapping[int, float], nodes: Sequence[int]) -> Weights:
    """``weights`` over ``nodes`` scaled to sum to 1 (missing nodes: 0); empty if the sum is not > 0."""
    raw = {node: float(weights.get(node, 0.0)) for node in nodes}
    total = sum(raw.values())
    if not (math.isfinite(total) and total > 0) or any(w < 0 for w in raw.values()):
        return {}
    return {node: w / total for node, w in raw.items()}


def _node(msg: Message) -> int:
    return int(msg.metadata.src_node_id)


def _metric(msg: Message, key: str) -> float:
    return float(records_of(msg.content, MetricRecord)[0][key])  # type: ignore[arg-type]


def _by_examples(strategy: FedAvg, replies: Sequence[Message]) -> Weights:
    return {_node(m): _metric(m, strategy.weighted_by_key) for m in replies}


def _selected(replies: Sequence[Message], chosen: Sequence[Any]) -> list[Message]:
    ids = {id(content) for content in chosen}
    return [m for m in replies if id(m.content) in ids]


def rule_weights(strategy: Strategy, replies: Sequence[Message]) -> Weights | None:
    """The weights the strategy's Flower aggregation rule gives ``replies`` (not normalised), or ``None``
    when fedeq does not know the rule."""
    if not replies:
        return {}
    if isinstance(strategy, Bulyan):
        f = strategy.num_malicious_nodes
        if len(replies) < 4 * f + 3:
            return {}  # Bulyan skips the round
        theta = len(replies) - 2 * f
        chosen = strategy.selection_rule([m.content for m in replies], f, theta)
        return {_node(m): 1.0 for m in _selected(replies, chosen)}
    if isinstance(strategy, MultiKrum):
        chosen = select_multikrum(
            [m.content for m in replies], strategy.num_malicious_nodes, strategy.num_nodes_to_select
        )
        return _by_examples(strategy, _selected(replies, chosen))
    if isinstance(strategy, QFedAvg):
        q = strategy.q
        return {_node(m): float((_metric(m, strategy.train_loss_key) + 1e-10) ** q) for m in replies}
    if isinstance(strategy, FedMedian | FedTrimmedAvg):
        return {_node(m): 1.0 for m in replies}
    if isinstance(strategy, FedAvg):
        return _by_examples(strategy, replies)
    inner = _wrapped(strategy)
    return None if inner is None else rule_weights(inner, replies)


def _wrapped(strategy: Strategy) -> Strategy | None:
    inner = vars(strategy).get("strategy")
    return inner if isinstance(inner, Strategy) else None


def weight_reporter(strategy: Strategy) -> ReportsWeights | None:
    """The strategy, or the first strategy it wraps, that implements the hook; ``None`` if none does."""
    current: Strategy | None = strategy
    while current is not None:
        if isinstance(current, ReportsWeights):
            return current
        current = _wrapped(current)
    return None
