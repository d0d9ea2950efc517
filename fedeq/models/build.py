"""Building a model by its config name, and registering new model families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fedeq.models.base import ModelFactory
from fedeq.registry import MODELS

__all__ = ["build_model", "register_model"]


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(input_shape, num_classes, cfg, deq_settings) -> nn.Module`` as the
    model family ``name`` (``model.name`` in a config); a thin alias of ``MODELS.register(name)``."""
    return MODELS.register(name)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, cfg: Any = None, **deq_settings: Any
) -> nn.Module:
    """Build a registered model by name; ``cfg`` is any object with the model's size attributes."""
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {', '.join(MODELS.names())} (got {name!r})")
    return MODELS.get(name)(tuple(input_shape), num_classes, cfg, deq_settings)
