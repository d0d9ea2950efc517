"""Reply validation mixin for Flower Message-API strategies.

``ReplyGuard`` sits in front of any :class:`flwr.serverapp.strategy.Strategy` (FedAvg and its
subclasses, FedMedian, Krum, FedAdam, ...) and filters client replies before they reach the
strategy's own aggregation.  A reply ``m_i`` is aggregated only if

* it carries content (no :class:`flwr.app.Error`),
* it holds exactly one ``ArrayRecord`` whose keys, shapes and dtypes equal those of the
  current global model and whose values are all finite (train replies only),
* it holds exactly one ``MetricRecord`` with every required key, finite values, a positive
  scalar weight ``n_i`` (the strategy's ``weighted_by_key``) and the round's majority key set.

Rejected replies are logged, counted and recorded, never averaged.  When no reply survives,
``aggregate_train`` returns ``(None, None)``; ``Strategy.start`` then keeps the global model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedeq.arrays import from_numpy, to_numpy

__all__ = ["ArrayLayout", "ReplyGuard", "array_layout", "records_of"]

#: ``key -> (shape, dtype)`` of every array in an ``ArrayRecord``.
ArrayLayout = dict[str, tuple[tuple[int, ...], str]]

_Record = TypeVar("_Record", ArrayRecord, MetricRecord, ConfigRecord)

_STATUSES = ("ok", "rejected", "failed")
"""Always counted; ``offline`` and ``dropped`` appear in the counts only when they occur."""


def array_layout(arrays: ArrayRecord) -> ArrayLayout:
    """Return ``{key: (shape, dtype)}`` of ``arrays`` without decoding the data."""
    return {key: (tuple(int(s) for s in arr.shape), str(arr.dtype)) for key, arr in arrays.items()}


def records_of(content: RecordDict, kind: type[_Record]) -> list[_Record]:
    """The records of type ``kind`` in ``content``, in order.

    Same as ``list(content.array_records.values())`` (or ``metric_records``, ``config_records``) without
    the type-checked copy of the dict that those properties build on every access.
    """
    return [record for record in content.values() if isinstance(record, kind)]


def _metric_values(record: MetricRecord) -> dict[str, Any]:
    """Plain-dict copy of a MetricRecord (lists are copied)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}


def _is_finite_metric(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_finite_metric(v) for v in value)
    return isinstance(value, int | float) and math.isfinite(value)


def _layout_mismatch(layout: ArrayLayout, reference: ArrayLayout) -> str | None:
    """Describe the first difference between two layouts, or ``None`` if equal."""
    missing = sorted(set(reference) - set(layout))
    extra = sorted(set(layout) - set(reference))
    if missing or extra:
        return f"array keys differ from the global model (missing={missing}, unexpected={extra})"
    for key, (shape, dtype) in reference.items():
        got_shape, got_dtype = layout[key]
        if got_shape != shape:
            return f"array {key!r} has shape {got_shape}, global model has {shape}"
        if got_dtype != dtype:
            return f"array {key!r} has dtype {got_dtype}, global model has {dtype}"
    return None


def _non_finite_array(arrays: ArrayRecord) -> str | None:
    """Describe the first array holding NaN/Inf (or failing to decode), else ``None``."""
    for key, arr in arrays.items():
        try:
            values = to_numpy(arr)
        except Exception as err:  # noqa: BLE001 - any decoding failure rejects the reply
            return f"array {key!r} cannot be decoded: {err}"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            n_nan = int(np.isnan(values).sum())
            n_inf = int(np.isinf(values).sum())
            return f"array {key!r} is not finite ({n_nan} NaN, {n_inf} Inf)"
    return None


def _cast_to_layout(arrays: ArrayRecord, reference: ArrayLayout) -> ArrayRecord:
    """Cast aggregated arrays back to the global model's dtypes (integers are rounded).

    Weighted averaging promotes integer buffers (e.g. BatchNorm counters) to float64; keeping
    the global dtypes stable is what lets the next round's dtype check accept honest clients.
    """
    if set(arrays.keys()) != set(reference):
        return arrays
    changed = False
    out: dict[str, Array] = {}
    for key, arr in arrays.items():
        dtype = np.dtype(reference[key][1])
        if str(arr.dtype) == reference[key][1]:
            out[key] = arr
            continue
        values = to_numpy(arr)
        if dtype.kind in "iub" and values.dtype.kind in "fc":
            values = np.rint(values.real)
        out[key] = from_numpy(np.asarray(values.astype(dtype)))
        changed = True
    return ArrayRecord(out) if changed else arrays


ReplyCheck = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]
"""An extra acceptance test of a valid train reply's metrics: ``None`` to accept, or ``(status, reason)``
with status ``"rejected"`` or ``"dropped"`` (e.g. a simulated deadline)."""


class ReplyGuard:
    """Mixin that validates replies before the wrapped strategy aggregates them.

    Use it first in the bases, e.g. ``class GuardedFedAvg(ReplyGuard, FedAvg)``.

    Attributes
    ----------
    required_metrics : tuple[str, ...]
        Keys every train reply's MetricRecord must contain (the strategy's
        ``weighted_by_key`` is always required as well).
    required_eval_metrics : tuple[str, ...]
        Keys every evaluate reply's MetricRecord must contain.
    client_log : list[dict]
        One entry per train reply: ``round, node_id, status, reason`` and the reply's metrics.
    round_counts : dict[int, dict[str, int]]
        ``{round: {"ok": n, "rejected": n, "failed": n}}`` for train replies.
    eval_client_log, eval_round_counts
        The same for evaluate replies.
    """

    required_metrics: tuple[str, ...] = ("num-examples",)
    required_eval_metrics: tuple[str, ...] = ("num-examples",)

    def __init__(
        self,
        *args: Any,
        required_metrics: Iterable[str] | None = None,
        required_eval_metrics: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if required_metrics is not None:
            self.required_metrics = tuple(required_metrics)
        if required_eval_metrics is not None:
            self.required_eval_metrics = tuple(required_eval_metrics)
        self.client_log: list[dict[str, Any]] = []
        self.round_counts: dict[int, dict[str, int]] = {}
        self.eval_client_log: list[dict[str, Any]] = []
        self.eval_round_counts: dict[int, dict[str, int]] = {}
        self.global_layout: ArrayLayout | None = None
        self.reply_checks: list[ReplyCheck] = []
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ configuration

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Record the keys/shapes/dtypes of the current global model."""
        self.global_layout = array_layout(arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Capture the global model layout, then delegate to the wrapped strategy."""
        self.set_global_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    # ------------------------------------------------------------------ aggregation

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies; aggregate the rest with the wrapped strategy.

        Returns ``(None, None)`` when every reply is rejected or failed.
        """
        valid = self.filter_replies(server_round, replies, train=True)
        if not valid:
            log(WARNING, "ReplyGuard: round %s has no valid train reply; global model kept", server_round)
            return None, None
        arrays, metrics = self.aggregate_valid_train(server_round, valid)
        if arrays is not None and self.global_layout is not None:
            arrays = _cast_to_layout(arrays, self.global_layout)
        return arrays, metrics

    def aggregate_valid_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate already validated train replies (default: the wrapped strategy)."""
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop failed/invalid evaluate replies; aggregate the rest with the wrapped strategy."""
        replies = list(replies)
        valid = self.filter_replies(server_round, replies, train=False)
        if not valid:
            if replies:
                log(WARNING, "ReplyGuard: round %s has no valid evaluate reply", server_round)
            return None
        return super().aggregate_evaluate(server_round, valid)  # type: ignore[misc]

    # ------------------------------------------------------------------ validation

    def _weight_key(self) -> str | None:
        key = getattr(self, "weighted_by_key", None)
        return key if isinstance(key, str) else None

    def _required(self, train: bool) -> tuple[str, ...]:
        keys = list(self.required_metrics if train else self.required_eval_metrics)
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
        metrics = _metric_values(metric_records[0])
        array_records = records_of(content, ArrayRecord)
        if train and len(array_records) != 1:
            return "rejected", f"expected exactly one ArrayRecord, got {len(array_records)}", metrics
        missing = [k for k in self._required(train) if k not in metrics]
        if missing:
            return "rejected", f"missing required metric(s) {missing}", metrics
        bad = sorted(k for k, v in metrics.items() if not _is_finite_metric(v))
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
                reason = _layout_mismatch(layouts[id(msg)], reference) or _non_finite_array(
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
                log(
                    WARNING,
                    "ReplyGuard: %s reply from node %s in round %s %s: %s",
                    "train" if train else "evaluate",
                    node_id,
                    server_round,
                    status,
                    reason,
                )
            entry: dict[str, Any] = {
                "round": server_round,
                "node_id": node_id,
                "status": status,
                "reason": reason,
            }
            for key, value in metrics.items():
                entry[key if key not in entry else f"metric/{key}"] = value
            log_list.append(entry)

        (self.round_counts if train else self.eval_round_counts)[server_round] = counts
        log(
            INFO,
            "ReplyGuard: %s round %s: %d ok, %d rejected, %d failed",
            "train" if train else "evaluate",
            server_round,
            counts["ok"],
            counts["rejected"],
            counts["failed"],
        )
        return valid

    # ------------------------------------------------------------------ reporting

    def total_counts(self, *, train: bool = True) -> dict[str, int]:
        """Sum of the per-round counters over all rounds."""
        per_round: Mapping[int, Mapping[str, int]] = self.round_counts if train else self.eval_round_counts
        keys = dict.fromkeys([*_STATUSES, *(k for c in per_round.values() for k in c)])
        return {s: sum(c.get(s, 0) for c in per_round.values()) for s in keys}

    def round_entries(self, server_round: int) -> list[dict[str, Any]]:
        """The train log's entries of ``server_round`` (the log is in round order: read from its end)."""
        start = len(self.client_log)
        while start > 0 and self.client_log[start - 1]["round"] >= server_round:
            start -= 1
        return [e for e in self.client_log[start:] if e["round"] == server_round]

    def rejected_nodes(self, server_round: int) -> Sequence[int]:
        """Node ids whose train reply was rejected or failed in ``server_round``."""
        return [e["node_id"] for e in self.round_entries(server_round) if e["status"] != "ok"]
