"""``ReplyGuard(strategy)``: validate client replies before any Flower strategy aggregates them.

The guard wraps a :class:`flwr.serverapp.strategy.Strategy` instance (FedAvg and its subclasses,
FedMedian, Krum, FedAdam, a plug-in, ...), delegates configuration and aggregation to it, and hands it
only the replies that pass. A reply is aggregated only if

* it carries content (no :class:`flwr.app.Error`),
* it holds exactly one ``ArrayRecord`` whose keys, shapes and dtypes equal those of the
  current global model and whose values are all finite (train replies only),
* it holds exactly one ``MetricRecord`` with every required key, finite values, a positive
  scalar weight ``n_i`` (the inner strategy's ``weighted_by_key``) and the round's majority key set,
* every extra :data:`ReplyCheck` accepts its metrics (train replies only).

Rejected replies are logged, counted and recorded, never averaged. When no reply survives,
``aggregate_train`` returns ``(None, None)``; the server then keeps the global model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .validation import (
    ArrayLayout,
    array_layout,
    cast_to_layout,
    is_finite_metric,
    layout_mismatch,
    metric_values,
    non_finite_array,
    records_of,
)
from .weights import normalise, rule_weights, weight_reporter

__all__ = ["ReplyCheck", "ReplyGuard"]

_STATUSES = ("ok", "rejected", "failed")
"""Always counted; ``offline`` and ``dropped`` appear in the counts only when they occur."""
_EXPECTED = ("offline", "dropped")
"""Statuses the simulation itself causes (a device's availability, the round's deadline): counted and logged
at INFO, not warned about."""

ReplyCheck = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]
"""An extra acceptance test of a valid train reply's metrics: ``None`` to accept, or ``(status, reason)``
with status ``"rejected"`` or ``"dropped"`` (e.g. a simulated deadline)."""


class ReplyGuard(Strategy):
    """A strategy that filters replies and lets ``strategy`` aggregate the valid ones.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy. It may declare ``required_metrics`` (metric keys its aggregation reads);
        train replies without them are rejected.
    required_metrics : Iterable[str], optional
        Keys every train reply's MetricRecord must contain (default: ``("num-examples",)``). The inner
        strategy's ``weighted_by_key`` is always required as well.
    required_eval_metrics : Iterable[str], optional
        Keys every evaluate reply's MetricRecord must contain (default: ``("num-examples",)``).

    Attributes
    ----------
    client_log : list[dict]
        One entry per train reply: ``round, node_id, status, reason, weight`` and the reply's metrics;
        ``weight`` is the reply's normalised aggregation weight (:mod:`strategies.weights`: the strategy's
        ``aggregation_weights`` hook, else its Flower rule; 0 for replies not aggregated).
    round_counts : dict[int, dict[str, int]]
        ``{round: {"ok": n, "rejected": n, "failed": n}}`` for train replies.
    eval_client_log, eval_round_counts
        The same for evaluate replies.
    reply_checks : list[ReplyCheck]
        Extra tests of valid train replies, applied in order.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        required_metrics: Iterable[str] | None = None,
        required_eval_metrics: Iterable[str] | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"ReplyGuard wraps a flwr Strategy instance, got {strategy!r}")
        self.strategy = strategy
        default = ("num-examples",)
        self.required_metrics = default if required_metrics is None else tuple(required_metrics)
        self.required_eval_metrics = (
            default if required_eval_metrics is None else tuple(required_eval_metrics)
        )
        self.client_log: list[dict[str, Any]] = []
        self.round_counts: dict[int, dict[str, int]] = {}
        self.eval_client_log: list[dict[str, Any]] = []
        self.eval_round_counts: dict[int, dict[str, int]] = {}
        self.global_layout: ArrayLayout | None = None
        self.reply_checks: list[ReplyCheck] = []
        self.federated_evaluation = True
        """``False``: no evaluate round at all (``configure_evaluate`` sends nothing)."""

    def __repr__(self) -> str:
        return f"ReplyGuard({self.strategy!r})"

    def summary(self) -> None:
        """Log the guard's requirements, then the wrapped strategy's summary."""
        log(INFO, "\t├──> Reply guard: required train metrics %s", list(self.required_keys(train=True)))
        if not self.federated_evaluation:
            log(INFO, "\t├──> Federated evaluation: off (the strategy's evaluate settings unused)")
        self.strategy.summary()

    # ------------------------------------------------------------------ configuration

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Record the keys/shapes/dtypes of the current global model."""
        self.global_layout = array_layout(arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Capture the global model layout, then let the wrapped strategy configure the round."""
        self.set_global_arrays(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation round (none when :attr:`federated_evaluation` is off)."""
        if not getattr(self, "federated_evaluation", True):  # absent in guards restored from old snapshots
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    # ------------------------------------------------------------------ aggregation

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies; aggregate the rest with the wrapped strategy (global dtypes kept).

        Returns ``(None, None)`` when every reply is rejected or failed.
        """
        valid = self.filter_replies(server_round, replies, train=True)
        if not valid:
            log(WARNING, "ReplyGuard: round %s has no valid train reply; global model kept", server_round)
            return None, None
        reporter = weight_reporter(self.strategy)
        weights = None if reporter is not None else rule_weights(self.strategy, valid)  # before: may consume
        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        if reporter is not None:
            weights = dict(reporter.aggregation_weights(server_round, valid))
        self._record_weights(server_round, valid, weights if arrays is not None else {})
        if arrays is not None and self.global_layout is not None:
            arrays = cast_to_layout(arrays, self.global_layout)
        return arrays, metrics

    def _record_weights(
        self, server_round: int, valid: Sequence[Message], weights: Mapping[int, float] | None
    ) -> None:
        """Put each accepted reply's normalised aggregation weight in its log entry (``weight``): 0 for
        every reply when the round aggregated nothing, ``None`` when the strategy's weights are unknown or not
        valid (negative, or not summing to a positive number)."""
        share: dict[int, float] | None = {}
        if weights:  # an empty mapping: nothing was aggregated
            share = normalise(weights, [int(m.metadata.src_node_id) for m in valid]) or None
        elif weights is None:
            share = None
        for entry in self.round_entries(server_round):
            if entry["status"] == "ok":
                entry["weight"] = None if share is None else share.get(entry["node_id"], 0.0)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop failed/invalid evaluate replies; aggregate the rest with the wrapped strategy."""
        replies = list(replies)
        valid = self.filter_replies(server_round, replies, train=False)
        if not valid:
            if replies:
                log(WARNING, "ReplyGuard: round %s has no valid evaluate reply", server_round)
            return None
        return self.strategy.aggregate_evaluate(server_round, valid)

    # ------------------------------------------------------------------ validation

    def _weight_key(self) -> str | None:
        key = getattr(self.strategy, "weighted_by_key", None)
        return key if isinstance(key, str) else None

    def required_keys(self, *, train: bool) -> tuple[str, ...]:
        """Metric keys a train (or evaluate) reply must hold: the guard's, the wrapped strategy's
        declared ``required_metrics`` (train only) and its ``weighted_by_key``."""
        if train:
            keys = [*self.required_metrics, *getattr(self.strategy, "required_metrics", ())]
        else:
            keys = list(self.required_eval_metrics)
        weight_key = self._weight_key()
        if weight_key is not None:
            keys.append(weight_key)
        return tuple(dict.fromkeys(keys))

    def _check_content(self, msg: Message, train: bool) -> tuple[str, str | None, dict[str, Any]]:
        """Return ``(status, reason, metrics)`` from the checks that need no other reply."""
        if msg.has_error():
            if msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                return "offline", msg.error.reason, {}
            return "failed", f"error reply (code {msg.error.code}): {msg.error.reason}", {}
        if not msg.has_content():
            return "failed", "reply carries neither content nor error", {}
        content = msg.content
        metric_records = records_of(content, MetricRecord)
        if len(metric_records) != 1:
            return "rejected", f"expected exactly one MetricRecord, got {len(metric_records)}", {}
        metrics = metric_values(metric_records[0])
        array_records = records_of(content, ArrayRecord)
        if train and len(array_records) != 1:
            return "rejected", f"expected exactly one ArrayRecord, got {len(array_records)}", metrics
        missing = [k for k in self.required_keys(train=train) if k not in metrics]
        if missing:
            return "rejected", f"missing required metric(s) {missing}", metrics
        bad = sorted(k for k, v in metrics.items() if not is_finite_metric(v))
        if bad:
            return "rejected", f"non-finite metric(s) {bad}", metrics
        weight_key = self._weight_key()
        if weight_key is not None:
            weight = metrics[weight_key]
            if isinstance(weight, list) or weight <= 0:
                return "rejected", f"metric {weight_key!r} must be a positive scalar, got {weight!r}", metrics
        return "ok", None, metrics

    def filter_replies(self, server_round: int, replies: Iterable[Message], *, train: bool) -> list[Message]:
        """Validate ``replies``, log and count each one, and return the valid ones in order."""
        replies = list(replies)
        checked = [(msg, *self._check_content(msg, train)) for msg in replies]

        # Cross-reply checks on the survivors: metric key set and (train) array layout.
        candidates = [(msg, metrics) for msg, status, _, metrics in checked if status == "ok"]
        majority_keys = Counter(frozenset(m) for _, m in candidates).most_common(1)
        layouts: dict[int, ArrayLayout] = {}
        reference = self.global_layout
        if train:
            for msg, _ in candidates:
                layouts[id(msg)] = array_layout(records_of(msg.content, ArrayRecord)[0])
            if reference is None and layouts:
                counts = Counter(tuple(sorted(lay.items())) for lay in layouts.values())
                reference = dict(counts.most_common(1)[0][0])

        counts = dict.fromkeys(_STATUSES, 0)
        log_list = self.client_log if train else self.eval_client_log
        valid: list[Message] = []
        for msg, status, reason, metrics in checked:
            if status == "ok" and majority_keys and frozenset(metrics) != majority_keys[0][0]:
                diff = sorted(frozenset(metrics) ^ majority_keys[0][0])
                status, reason = "rejected", f"metric keys differ from the round's majority: {diff}"
            if status == "ok" and train:
                assert reference is not None
                reason = layout_mismatch(layouts[id(msg)], reference) or non_finite_array(
                    records_of(msg.content, ArrayRecord)[0]
                )
                status = "rejected" if reason else "ok"
                for check in self.reply_checks if status == "ok" else ():
                    verdict = check(metrics)
                    if verdict is not None:
                        status, reason = verdict
                        break
            node_id = int(msg.metadata.src_node_id)
            counts[status] = counts.get(status, 0) + 1
            if status == "ok":
                valid.append(msg)
            else:
                text = str(reason)
                log(
                    INFO if status in _EXPECTED else WARNING,
                    "ReplyGuard: %s reply from node %s in round %s %s",
                    "train" if train else "evaluate",
                    node_id,
                    server_round,
                    text if text.startswith(f"{status}:") else f"{status}: {text}",
                )
            entry: dict[str, Any] = {
                "round": server_round,
                "node_id": node_id,
                "status": status,
                "reason": reason,
            }
            if train:
                entry["weight"] = 0.0  # the accepted ones get theirs once the round is aggregated
            for key, value in metrics.items():
                entry[key if key not in entry else f"metric/{key}"] = value
            log_list.append(entry)

        (self.round_counts if train else self.eval_round_counts)[server_round] = counts
        log(
            INFO,
            "ReplyGuard: %s round %s: %s",
            "train" if train else "evaluate",
            server_round,
            ", ".join(f"{n} {status}" for status, n in counts.items() if n or status in _STATUSES),
        )
        return valid

    # ------------------------------------------------------------------ reporting

    def total_counts(self, *, train: bool = True) -> dict[str, int]:
        """Sum of the per-round counters over all rounds."""
        per_round: Mapping[int, Mapping[str, int]] = self.round_counts if train else self.eval_round_counts
        keys = dict.fromkeys([*_STATUSES, *(k for c in per_round.values() for k in c)])
        return {s: sum(c.get(s, 0) for c in per_round.values()) for s in keys}

    def round_entries(self, server_round: int, *, train: bool = True) -> list[dict[str, Any]]:
        """The train (``train=False``: evaluate) log's entries of ``server_round`` (the log is in round
        order: read from its end)."""
        log = self.client_log if train else self.eval_client_log
        start = len(log)
        while start > 0 and log[start - 1]["round"] >= server_round:
            start -= 1
        return [e for e in log[start:] if e["round"] == server_round]

    def rejected_nodes(self, server_round: int) -> Sequence[int]:
        """Node ids whose train reply was rejected or failed in ``server_round``."""
        return [e["node_id"] for e in self.round_entries(server_round) if e["status"] != "ok"]
