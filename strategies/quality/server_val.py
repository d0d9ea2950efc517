"""``server_val``: q = exp(-ℓ_i/τ), ℓ_i the mean cross-entropy of the client's model θ_i on the server's
validation split (``data.server_val_fraction``), evaluated at the settings of the tier with the largest
forward budget (those of the headline test accuracy)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import QualityContext, register_quality


@register_quality("server_val", needs=("arrays", "evaluate"))
def server_val_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = exp(-ℓ_i/τ) with ℓ_i = evaluate(θ_i) on the server's validation split."""
    if ctx.evaluate is None:
        raise ValueError("server_val needs a server validation split (data.server_val_fraction > 0)")
    return math.exp(-float(ctx.evaluate(ctx.arrays())) / ctx.temperature)
