"""``uniform``: q = 1, i.e. plain FedAvg weights w_i = n_i."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import QualityContext, register_quality


@register_quality("uniform")
def uniform_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = 1 (plain FedAvg weights w_i = n_i)."""
    return 1.0
