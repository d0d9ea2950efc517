"""Aggregation math: the weighted average of arrays and the per-tier means of reply metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedeq.arrays import from_numpy, to_numpy

__all__ = ["tier_metrics", "weighted_average"]


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
