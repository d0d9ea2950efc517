"""Server-side strategies for fedeq: the reply guard (a wrapper), quality-weighted FedAvg, FedNova-style
normalised averaging, quality functions and the strategy registry."""

from .aggregate import tier_metrics, weighted_average
from .fednova import FedNova
from .guard import ReplyCheck, ReplyGuard
from .quality import QualityContext, QualityFn, QualityFunction, quality_function, register_quality
from .quality_weighted import QualityWeightedFedAvg
from .registry import (
    GUARD_PARAMETERS,
    STRATEGIES,
    accepted_parameters,
    build_strategy,
    resolve_strategy_class,
)
from .validation import array_layout, records_of
from .weights import ReportsWeights

__all__ = [
    "GUARD_PARAMETERS",
    "FedNova",
    "STRATEGIES",
    "QualityContext",
    "QualityFn",
    "QualityFunction",
    "QualityWeightedFedAvg",
    "ReplyCheck",
    "ReplyGuard",
    "ReportsWeights",
    "accepted_parameters",
    "array_layout",
    "build_strategy",
    "quality_function",
    "records_of",
    "register_quality",
    "resolve_strategy_class",
    "tier_metrics",
    "weighted_average",
]
