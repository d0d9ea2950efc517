"""``residual``: q = exp(-r/τ), r the mean relative fixed-point residual the client reached."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import QualityContext, register_quality


@register_quality("residual", requires=("fp-residual",))
def residual_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = exp(-r/τ) with r the mean relative fixed-point residual."""
    return math.exp(-float(metrics["fp-residual"]) / ctx.temperature)
