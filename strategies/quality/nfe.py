"""``nfe``: q = W_i / max_j W_j, W = local-steps · (nfe-fwd + nfe-bwd), the work the client actually did."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import QualityContext, register_quality

_KEYS = ("local-steps", "nfe-fwd", "nfe-bwd")


def work(metrics: Mapping[str, Any]) -> float:
    """W = s · (F + B): local optimizer steps times the function evaluations and VJPs per step."""
    return float(metrics["local-steps"]) * (float(metrics["nfe-fwd"]) + float(metrics["nfe-bwd"]))


@register_quality("nfe", requires=_KEYS)
def nfe_quality(metrics: Mapping[str, Any], ctx: QualityContext) -> float:
    """q = W_i / max_j W_j (0 if max_j W_j <= 0)."""
    w_max = max((work(m) for m in ctx.round_metrics if all(k in m for k in _KEYS)), default=0.0)
    return work(metrics) / w_max if w_max > 0 else 0.0
