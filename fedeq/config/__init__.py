"""Configuration of ``fedeq simulate``: a validated schema, YAML files, overrides and the run config.

``load_config(path, overrides)`` returns a :class:`FedeqConfig` (a pydantic model with attribute
access); every problem is a one-line :class:`ConfigError` naming the full dotted key.
"""

from fedeq.config.errors import ConfigError
from fedeq.config.load import (
    RUN_CONFIG_KEY,
    RUN_OVERRIDES_KEY,
    apply_overrides,
    attribute_view,
    config_from_run_config,
    config_from_yaml,
    default_config,
    load_config,
    to_run_config,
    to_yaml,
)
from fedeq.config.schema import (
    AdversarialMode,
    AttackNorm,
    DataConfig,
    Device,
    EvalConfig,
    FaultConfig,
    FedeqConfig,
    MaskPattern,
    ModelConfig,
    Optimizer,
    RayConfig,
    StopMode,
    StrategyConfig,
    TrainConfig,
)
from fedeq.config.tiers import SHARE_TOLERANCE, DeadlinePolicy, DevicesConfig, TierConfig
from fedeq.config.validate import validate

__all__ = [
    "RUN_CONFIG_KEY",
    "RUN_OVERRIDES_KEY",
    "SHARE_TOLERANCE",
    "AdversarialMode",
    "AttackNorm",
    "ConfigError",
    "DataConfig",
    "DeadlinePolicy",
    "Device",
    "DevicesConfig",
    "EvalConfig",
    "FaultConfig",
    "FedeqConfig",
    "MaskPattern",
    "ModelConfig",
    "Optimizer",
    "RayConfig",
    "StopMode",
    "StrategyConfig",
    "TierConfig",
    "TrainConfig",
    "apply_overrides",
    "attribute_view",
    "config_from_run_config",
    "config_from_yaml",
    "default_config",
    "load_config",
    "to_run_config",
    "to_yaml",
    "validate",
]
