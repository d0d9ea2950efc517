"""``val_loss``: q = exp(-ℓ/τ), ℓ the client's validation loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import QualityContext, register_quality


@register_quality("val_loss", requires=("val-loss",))
def val_loss_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = exp(-ℓ/τ) with ℓ the client's validation loss."""
    return math.exp(-float(metrics["val-loss"]) / ctx.temperature)
