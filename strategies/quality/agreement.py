"""``agreement``: q = max(0, cos(Δ_i, median_j Δ_j)), the update's agreement with the round's robust mean.

Δ_j = θ_j − θ are the round's updates (floating arrays, flattened) and the median is coordinate-wise.
An update or median of norm 0 gets q = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import QualityContext, register_quality


@register_quality("agreement", needs=("updates",))
def agreement_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = max(0, ⟨Δ_i, m⟩ / (‖Δ_i‖ ‖m‖)) with m = median_j Δ_j."""
    delta, median = ctx.update(), ctx.median_update()
    norm = float(np.linalg.norm(delta)) * float(np.linalg.norm(median))
    return max(0.0, float(np.dot(delta, median)) / norm) if norm > 0 else 0.0
