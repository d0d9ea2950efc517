"""Round summaries of per-client personalised accuracies."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["WORST_SHARE", "personal_summary"]

WORST_SHARE = 0.1
"""The worst share of clients that ``personal_acc_worst10`` averages over."""


def personal_summary(accuracies: Sequence[float]) -> dict[str, float]:
    """``personal_acc`` (mean over clients, each client counting once) and ``personal_acc_worst10`` (mean of
    the lowest ``ceil(10%)`` of the clients' accuracies, at least one client); NaN without clients."""
    values = sorted(float(a) for a in accuracies if a == a)
    if not values:
        return {"personal_acc": float("nan"), "personal_acc_worst10": float("nan")}
    k = max(1, math.ceil(WORST_SHARE * len(values)))
    return {
        "personal_acc": sum(values) / len(values),
        "personal_acc_worst10": sum(values[:k]) / k,
    }
