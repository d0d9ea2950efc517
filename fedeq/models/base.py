"""What every model family shares: the output type, the factory signature and small config helpers.

Every model's ``forward(x, **deq_overrides)`` returns a :class:`ModelOutput`; the overrides (``f_max_iter``,
``b_max_iter``, ``solver``, ``backward``, ...) reach the DEQ layer, so one set of weights serves devices with
different budgets. Explicit models accept and ignore them.

A model family is a factory ``factory(input_shape, num_classes, cfg, deq_settings) -> nn.Module`` registered
under its config name (``model.name``) with :func:`fedeq.models.register_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedeq.deq import DEQOutput

Tensor = torch.Tensor

__all__ = ["ModelFactory", "ModelOutput", "config_value", "flattened_size", "num_parameters"]

ModelFactory = Callable[[tuple[int, ...], int, Any, dict[str, Any]], nn.Module]
"""``factory(input_shape, num_classes, cfg, deq_settings) -> nn.Module``: one model family."""


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
