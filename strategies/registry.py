"""Strategy registry: built-in names, ``package.module:ClassName`` plug-ins, construction behind a guard."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from .fednova import FedNova
from .guard import ReplyGuard
from .quality_weighted import QualityWeightedFedAvg

__all__ = [
    "GUARD_PARAMETERS",
    "STRATEGIES",
    "accepted_parameters",
    "build_strategy",
    "resolve_strategy_class",
]

#: Built-in strategy names.
STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "quality": QualityWeightedFedAvg,
    "fedprox": FedProx,
    "fednova": FedNova,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "qfedavg": QFedAvg,
}

# Defaults matching this project's client metric names (lowest precedence).
_BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "qfedavg": {"train_loss_key": "train-loss"},
}

GUARD_PARAMETERS = ("required_metrics", "required_eval_metrics")
"""``strategy.kwargs`` keys that configure the :class:`ReplyGuard` rather than the wrapped strategy."""


def _allowed() -> str:
    return f"built-in names {sorted(STRATEGIES)} or 'package.module:ClassName'"


def resolve_strategy_class(name: str) -> type:
    """Return the class for a built-in name or an importable ``"package.module:ClassName"``.

    Raises ``ValueError`` naming ``strategy.name`` if the name is unknown, cannot be imported,
    or does not denote a :class:`flwr.serverapp.strategy.Strategy` subclass.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"strategy.name must be a non-empty string, got {name!r}; allowed: {_allowed()}")
    name = name.strip()
    if name.lower() in STRATEGIES:
        return STRATEGIES[name.lower()]
    if ":" not in name:
        raise ValueError(f"strategy.name={name!r} is unknown; allowed: {_allowed()}")
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"strategy.name={name!r} is malformed; allowed: {_allowed()}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"strategy.name={name!r} cannot be imported ({type(err).__name__}: {err}); allowed: {_allowed()}"
        ) from err
    if not (inspect.isclass(obj) and issubclass(obj, Strategy)):
        raise ValueError(f"strategy.name={name!r} resolves to {obj!r}, which is not a flwr Strategy subclass")
    return obj


def accepted_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters of ``cls(...)`` and whether the set is closed (no open ``**kwargs``).

    ``__init__`` methods taking ``**kwargs`` are followed along the MRO, assuming they forward
    the extra keywords to ``super().__init__``.
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return params, True
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            return params, False
        open_kwargs = False
        for i, param in enumerate(signature.parameters.values()):
            if i == 0 or param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
                continue
            if param.kind is param.VAR_KEYWORD:
                open_kwargs = True
                continue
            params.setdefault(param.name, param)
        if not open_kwargs:
            return params, True
    return params, True


def build_strategy(name: str, kwargs: Mapping[str, Any] | None = None, **defaults: Any) -> ReplyGuard:
    """Instantiate strategy ``name`` and wrap it in a :class:`ReplyGuard`.

    ``kwargs`` (user settings, ``strategy.kwargs``) override ``defaults`` (e.g. ``fraction_train``);
    :data:`GUARD_PARAMETERS` among them go to the guard, the rest to the strategy. Defaults the
    strategy's constructor does not accept are dropped; user kwargs that neither accepts raise
    ``ValueError`` naming ``strategy.kwargs.<key>`` and the accepted parameters.
    """
    cls = resolve_strategy_class(name)
    params, closed = accepted_parameters(cls)
    user = dict(kwargs or {})
    for key in user:
        if not isinstance(key, str):
            raise ValueError(f"strategy.kwargs keys must be strings, got {key!r}")
        if closed and key not in params and key not in GUARD_PARAMETERS:
            raise ValueError(
                f"strategy.kwargs.{key} is not accepted by {cls.__name__} (strategy.name={name!r}); "
                f"accepted parameters: {sorted({*params, *GUARD_PARAMETERS})}"
            )
    guard_kwargs = {key: user.pop(key) for key in GUARD_PARAMETERS if key in user}
    merged: dict[str, Any] = {}
    base_defaults = {**_BUILTIN_DEFAULTS.get(name.strip().lower(), {}), **defaults}
    for key, value in base_defaults.items():
        if not closed or key in params:
            merged[key] = value
    merged.update(user)
    missing = [
        p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in merged
    ]
    if missing:
        raise ValueError(
            f"strategy.kwargs.{missing[0]} is required by {cls.__name__} (strategy.name={name!r}); "
            f"missing: {missing}"
        )
    try:
        return ReplyGuard(cls(**merged), **guard_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid strategy.kwargs for strategy.name={name!r}: {err}") from err
