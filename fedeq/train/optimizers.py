"""The local optimizer that ``train.optimizer`` names, as a ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import SGD, Adam, Optimizer

Tensor = torch.Tensor

SGD_MOMENTUM = 0.9
"""The heavy-ball momentum of ``sgd``."""


def _adam(params: Iterable[Tensor], lr: float, weight_decay: float) -> Optimizer:
    return Adam(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: Iterable[Tensor], lr: float, weight_decay: float) -> Optimizer:
    return SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)


_FACTORIES: dict[str, Callable[[Iterable[Tensor], float, float], Optimizer]] = {"adam": _adam, "sgd": _sgd}

OPTIMIZERS: tuple[str, ...] = tuple(_FACTORIES)
"""The names ``train.optimizer`` accepts."""


def make_optimizer(name: str, params: Iterable[Tensor], lr: float, weight_decay: float = 0.0) -> Optimizer:
    """``adam`` (``torch.optim.Adam``, default betas) or ``sgd`` (``torch.optim.SGD``, momentum 0.9), both
    with L2 ``weight_decay`` added to the gradient."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")
    return factory(params, lr, weight_decay)
