"""fedeq: federated learning of Deep Equilibrium (DEQ) models on heterogeneous edge devices.

The names below are the curated public API; each is imported from its subpackage on first use, so
``import fedeq`` stays cheap (no torch, Flower or Ray import until a name is needed).

=====================  ==========================================================================
DEQ core               ``DEQ``, ``DEQSettings``, ``DEQOutput``, ``solve``, ``SolverStats``
models                 ``build_model``, ``register_model``, ``DEQClassifier``, ``ModelOutput``,
                       ``num_parameters``
data                   ``load_dataset``, ``register_dataset``
configuration          ``load_config``, ``ConfigError``
training               ``train_local``, ``evaluate``, ``accuracy_vs_budget``
robustness             ``AttackConfig``, ``run_attack``, ``robust_accuracy``
extension points       ``Registry``, ``SOLVERS``, ``BACKWARDS``, ``MODELS``, ``DATASETS``,
                       ``PARTITIONERS``, ``QUALITY``, ``ENGINES``, ``import_plugins``
=====================  ==========================================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "DEQ": "fedeq.deq",
    "DEQSettings": "fedeq.deq",
    "DEQOutput": "fedeq.deq",
    "solve": "fedeq.deq",
    "SolverStats": "fedeq.deq",
    "build_model": "fedeq.models",
    "DEQClassifier": "fedeq.models",
    "register_model": "fedeq.models",
    "ModelOutput": "fedeq.models",
    "num_parameters": "fedeq.models",
    "load_dataset": "fedeq.data",
    "register_dataset": "fedeq.data",
    "load_config": "fedeq.config",
    "ConfigError": "fedeq.config",
    "train_local": "fedeq.train",
    "evaluate": "fedeq.train",
    "accuracy_vs_budget": "fedeq.train",
    "AttackConfig": "fedeq.robust",
    "run_attack": "fedeq.robust",
    "robust_accuracy": "fedeq.robust",
    "Registry": "fedeq.registry",
    "SOLVERS": "fedeq.registry",
    "BACKWARDS": "fedeq.registry",
    "MODELS": "fedeq.registry",
    "DATASETS": "fedeq.registry",
    "PARTITIONERS": "fedeq.registry",
    "QUALITY": "fedeq.registry",
    "ENGINES": "fedeq.registry",
    "import_plugins": "fedeq.registry",
}

__all__ = [
    "AttackConfig",
    "BACKWARDS",
    "ConfigError",
    "DATASETS",
    "DEQ",
    "DEQClassifier",
    "DEQOutput",
    "DEQSettings",
    "ENGINES",
    "MODELS",
    "ModelOutput",
    "PARTITIONERS",
    "QUALITY",
    "Registry",
    "SOLVERS",
    "SolverStats",
    "accuracy_vs_budget",
    "build_model",
    "evaluate",
    "import_plugins",
    "load_config",
    "load_dataset",
    "num_parameters",
    "register_dataset",
    "register_model",
    "robust_accuracy",
    "run_attack",
    "solve",
    "train_local",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedeq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static view of the lazy names for type checkers and IDEs
    from fedeq.config import ConfigError, load_config
    from fedeq.data import load_dataset, register_dataset
    from fedeq.deq import DEQ, DEQOutput, DEQSettings, SolverStats, solve
    from fedeq.models import DEQClassifier, ModelOutput, build_model, num_parameters, register_model
    from fedeq.registry import (
        BACKWARDS,
        DATASETS,
        ENGINES,
        MODELS,
        PARTITIONERS,
        QUALITY,
        SOLVERS,
        Registry,
        import_plugins,
    )
    from fedeq.robust import AttackConfig, robust_accuracy, run_attack
    from fedeq.train import accuracy_vs_budget, evaluate, train_local
