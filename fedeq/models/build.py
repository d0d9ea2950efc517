"""Building a model by its config name, and registering new model families.

One protocol for every model, built-in or not (:class:`~fedeq.models.base.ModelFactory`)::

    factory(input_shape, num_classes, cfg, **kwargs) -> nn.Module

``model.name`` is a registered family or ``package.module:factory``; ``kwargs`` are ``model.kwargs``.
DEQ settings given to :func:`build_model` become the model's defaults through
:func:`~fedeq.models.base.set_deq_settings`; a device tier's settings reach ``forward`` per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedeq.config.model_factory import kwargs_problem, resolve_model_factory
from fedeq.models.base import ModelFactory, set_deq_settings
from fedeq.registry import MODELS

__all__ = ["build_model", "initial_model", "model_kwargs", "register_model"]


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(input_shape, num_classes, cfg, **kwargs) -> nn.Module`` as the
    model family ``name`` (``model.name`` in a config); a thin alias of ``MODELS.register(name)``."""
    return MODELS.register(name)


def model_kwargs(cfg: Any) -> dict[str, Any]:
    """The factory options of a model section: ``cfg.kwargs`` as a dict (``{}`` without any)."""
    kwargs = getattr(cfg, "kwargs", None) if cfg is not None else None
    if kwargs is None:
        return {}
    if isinstance(kwargs, Mapping):
        return dict(kwargs)
    return dict(vars(kwargs))  # an attribute view (SimpleNamespace) of the mapping


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, cfg: Any = None, **deq_settings: Any
) -> nn.Module:
    """Build model ``name`` (a registered family or ``package.module:factory``).

    ``cfg`` is the ``model`` section of a config (or any object with the sizes the family reads, or
    ``None``); its ``kwargs`` are passed to the factory as keyword arguments. ``deq_settings`` become
    the defaults of the model's DEQ layers. ``ValueError`` names ``model.name`` or ``model.kwargs.<key>``.
    """
    try:
        factory = resolve_model_factory(name)
    except ValueError as exc:
        if ":" in name:
            raise ValueError(f"model.name={name!r}: {exc}") from None
        raise ValueError(f"model.name must be one of {', '.join(MODELS.names())} (got {name!r})") from None
    kwargs = model_kwargs(cfg)
    found = kwargs_problem(factory, kwargs)
    if found is not None:
        key, what, allowed = found
        where = f"model.kwargs.{key}" if key else f"model.name={name!r}"
        raise ValueError(f"{where}: {what}; allowed: {allowed}")
    model = factory(tuple(input_shape), num_classes, cfg, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.name={name!r}: the factory returned {type(model).__name__}, not an nn.Module")
    set_deq_settings(model, **deq_settings)
    return model


def initial_model(cfg: Any, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The run's initial model: :func:`build_model` of ``cfg.model`` right after
    ``torch.manual_seed(cfg.seed)``. The server's global model and every client's personal part start from
    it; a client builds it inside ``torch.random.fork_rng()`` so its own random stream is left as it was."""
    torch.manual_seed(int(cfg.seed))
    return build_model(cfg.model.name, tuple(input_shape), num_classes, cfg.model)
