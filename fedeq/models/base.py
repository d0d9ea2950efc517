"""What every model family shares: the output type, the factory signature and small config helpers.

Every model's ``forward(x, **deq_overrides)`` returns a :class:`ModelOutput`; the overrides (``f_max_iter``,
``b_max_iter``, ``solver``, ``backward``, ...) reach the DEQ layer, so one set of weights serves devices with
different budgets. Explicit models accept and ignore them.

A model family is a factory following :class:`ModelFactory`, ``factory(input_shape, num_classes, cfg,
**kwargs) -> nn.Module``, registered under its config name (``model.name``) with
:func:`fedeq.models.register_model` or named as ``package.module:factory``. A factory never sees the DEQ
settings: :func:`~fedeq.models.build_model` applies build-time settings to the built model's DEQ layers
(:func:`~fedeq.models.set_deq_settings`), and a device tier's settings arrive per call as overrides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedeq.deq import DEQOutput, DEQSettings

Tensor = torch.Tensor

__all__ = [
    "DEQParts",
    "ModelFactory",
    "ModelOutput",
    "config_value",
    "flattened_size",
    "num_parameters",
    "set_deq_settings",
]


class ModelFactory(Protocol):
    """``factory(input_shape, num_classes, cfg, **kwargs) -> nn.Module``: one model family.

    ``input_shape`` is the shape of one example (``(1, 8, 8)`` for digits), ``cfg`` the ``model`` section
    of the config (attributes ``hidden``, ``channels``, ``tol``, ...; ``None`` outside a run) and
    ``kwargs`` the entries of ``model.kwargs``, checked against the factory's signature before a run
    starts. The module's ``forward(x, **deq_overrides)`` returns a :class:`ModelOutput`.
    """

    def __call__(
        self, input_shape: tuple[int, ...], num_classes: int, cfg: Any, /, **kwargs: Any
    ) -> nn.Module: ...


@dataclass
class ModelOutput:
    logits: Tensor
    deq: DEQOutput | None = None
    """Solver statistics of the DEQ layer (``None`` for explicit models)."""

    @property
    def aux_loss(self) -> Tensor | None:
        """Jacobian regularization term when requested, else ``None``."""
        return None if self.deq is None else self.deq.jac_loss


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what one federated round sends per direction)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flattened_size(input_shape: tuple[int, ...]) -> int:
    """Number of features of one example once flattened: the product of ``input_shape``."""
    return math.prod(input_shape)


def config_value(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key`` if ``cfg`` has it, else ``default`` (also when there is no ``cfg`` at all)."""
    return default if cfg is None else getattr(cfg, key, default)


def set_deq_settings(model: nn.Module, **settings: Any) -> int:
    """Apply DEQ settings (fields of :class:`~fedeq.deq.DEQSettings`) as the defaults of ``model``.

    Every submodule holding a :class:`~fedeq.deq.DEQSettings` as ``settings`` (each
    :class:`~fedeq.deq.DEQ` layer, and families that run their own solve) gets ``settings`` merged into
    its own. Unknown names or invalid values raise ``ValueError`` even when the model has no DEQ layer.
    Returns the number of submodules updated.
    """
    if not settings:
        return 0
    DEQSettings().override(**settings)  # validates names and values
    count = 0
    for module in model.modules():
        current = vars(module).get("settings")
        if isinstance(current, DEQSettings):
            module.settings = current.override(**settings)
            count += 1
    return count


@dataclass
class DEQParts:
    """``inject(x) -> c``, ``cell(z, c) -> z``, ``readout(z) -> logits`` and the initial state ``z0(c)``."""

    inject: Callable[[Tensor], Any]
    cell: Callable[[Tensor, Any], Tensor]
    readout: Callable[[Tensor], Tensor]
    z0: Callable[[Any], Tensor]
    settings: Any
    """The model's :class:`~fedeq.deq.layer.DEQSettings` (solver, budgets, tolerance)."""

    def f(self, z: Tensor, x: Tensor) -> Tensor:
        """``f(z, x) = cell(z, inject(x))``."""
        return self.cell(z, self.inject(x))
