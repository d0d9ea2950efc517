"""Server-side strategies for fedeq: reply guard, quality-weighted FedAvg and a strategy registry."""

from .guard import ReplyGuard, array_layout
from .quality import (
    QUALITY_FUNCTIONS,
    QUALITY_REQUIREMENTS,
    QualityContext,
    QualityFn,
    QualityWeightedFedAvg,
    register_quality,
    tier_metrics,
    weighted_average,
)
from .registry import STRATEGIES, accepted_parameters, build_strategy, guarded_class, resolve_strategy_class

__all__ = [
    "QUALITY_FUNCTIONS",
    "QUALITY_REQUIREMENTS",
    "STRATEGIES",
    "QualityContext",
    "QualityFn",
    "QualityWeightedFedAvg",
    "ReplyGuard",
    "accepted_parameters",
    "array_layout",
    "build_strategy",
    "guarded_class",
    "register_quality",
    "resolve_strategy_class",
    "tier_metrics",
    "weighted_average",
]
