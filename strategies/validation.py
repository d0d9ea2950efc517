"""Checks of single replies and array layouts, used by :class:`strategies.guard.ReplyGuard`."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedeq.arrays import from_numpy, to_numpy

__all__ = [
    "ArrayLayout",
    "array_layout",
    "cast_to_layout",
    "is_finite_metric",
    "layout_mismatch",
    "metric_values",
    "non_finite_array",
    "records_of",
]

#: ``key -> (shape, dtype)`` of every array in an ``ArrayRecord``.
ArrayLayout = dict[str, tuple[tuple[int, ...], str]]

_Record = TypeVar("_Record", ArrayRecord, MetricRecord, ConfigRecord)


def array_layout(arrays: ArrayRecord) -> ArrayLayout:
    """Return ``{key: (shape, dtype)}`` of ``arrays`` without decoding the data."""
    return {key: (tuple(int(s) for s in arr.shape), str(arr.dtype)) for key, arr in arrays.items()}


def records_of(content: RecordDict, kind: type[_Record]) -> list[_Record]:
    """The records of type ``kind`` in ``content``, in order.

    Same as ``list(content.array_records.values())`` (or ``metric_records``, ``config_records``) without
    the type-checked copy of the dict that those properties build on every access.
    """
    return [record for record in content.values() if isinstance(record, kind)]


def metric_values(record: MetricRecord) -> dict[str, Any]:
    """Plain-dict copy of a MetricRecord (lists are copied)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}


def is_finite_metric(value: Any) -> bool:
    """Whether a metric value (a number or a list of numbers) is finite."""
    if isinstance(value, list):
        return all(is_finite_metric(v) for v in value)
    return isinstance(value, int | float) and math.isfinite(value)


def layout_mismatch(layout: ArrayLayout, reference: ArrayLayout) -> str | None:
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


def non_finite_array(arrays: ArrayRecord) -> str | None:
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


def cast_to_layout(arrays: ArrayRecord, reference: ArrayLayout) -> ArrayRecord:
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
