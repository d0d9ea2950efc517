"""The equilibrium map of a fedeq model written as plain functions of the state and the input.

Input optimization (entropy-reducing input updates, JIIO) needs more than ``model(x)``: it evaluates the
cell ``f(z, x)`` at states of its own choosing and differentiates it with respect to ``z`` and ``x``. For a
model with input injection ``c = inject(x)``, cell ``z ↦ cell(z, c)`` and readout ``logits = readout(z)``:

    f(z, x) = cell(z, inject(x)),    z* = f(z*, x),    logits = readout(z*).

:func:`deq_parts` builds these functions for :class:`~fedeq.models.mlp_deq.MLPDEQ` and
:class:`~fedeq.models.conv_deq.ConvDEQ` (and any module exposing a ``parts()`` method returning
:class:`DEQParts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedeq.models.conv_deq import ConvDEQ
from fedeq.models.mlp_deq import MLPDEQ

Tensor = torch.Tensor

__all__ = ["DEQParts", "deq_parts", "entropy"]


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


def deq_parts(model: nn.Module) -> DEQParts:
    """The equilibrium map of ``model`` as functions; ``TypeError`` for models without one."""
    custom = getattr(model, "parts", None)
    if callable(custom):
        parts = custom()
        if isinstance(parts, DEQParts):
            return parts
    if isinstance(model, MLPDEQ):
        m = model

        def inject_mlp(x: Tensor) -> tuple[Tensor, Tensor]:
            w = m.scale(m.weight) if m.scale is not None else m.weight
            return m.inject(x.flatten(1)), w

        return DEQParts(
            inject=inject_mlp,
            cell=m.deq.func,
            readout=m.head,
            z0=lambda c: torch.zeros_like(c[0]),
            settings=m.deq.settings,
        )
    if isinstance(model, ConvDEQ):
        c_model = model
        return DEQParts(
            inject=c_model.inject,
            cell=c_model.deq.func,
            readout=lambda z: c_model.head(z.mean(dim=(2, 3))),
            z0=torch.zeros_like,
            settings=c_model.deq.settings,
        )
    raise TypeError(
        f"input optimization needs a DEQ model with an exposed equilibrium map (MLPDEQ, ConvDEQ or a "
        f"module with parts()); got {type(model).__name__}"
    )


def entropy(logits: Tensor) -> Tensor:
    """Per-sample prediction entropy ``H(p) = -Σ_c p_c log p_c`` with ``p = softmax(logits)``, shape (B,)."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)
