"""``budget``: q = K_i / max_j K_j, K the forward iteration budget of the client's tier."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import QualityContext, register_quality


@register_quality("budget", requires=("budget",))
def budget_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = K_i / K_max, K the tier's forward iteration budget (0 if K_max <= 0)."""
    k_max = ctx.max_of("budget")
    return float(metrics["budget"]) / k_max if k_max > 0 else 0.0
