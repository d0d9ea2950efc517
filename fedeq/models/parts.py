"""The equilibrium map of a fedeq model written as plain functions of the state and the input.

Input optimization (entropy-reducing input updates, JIIO) needs more than ``model(x)``: it evaluates the
cell ``f(z, x)`` at states of its own choosing and differentiates it with respect to ``z`` and ``x``. For a
model with input injection ``c = inject(x)``, cell ``z ↦ cell(z, c)`` and readout ``logits = readout(z)``:

    f(z, x) = cell(z, inject(x)),    z* = f(z*, x),    logits = readout(z*).

:func:`deq_parts` returns these functions for every :class:`~fedeq.models.DEQClassifier` (such as
:class:`~fedeq.models.mlp_deq.MLPDEQ`), for :class:`~fedeq.models.conv_deq.ConvDEQ`, and for any module
exposing a ``parts()`` method returning :class:`DEQParts`.
"""

from __future__ import annotations

import torch
from torch import nn

from fedeq.models.base import DEQParts
from fedeq.models.conv_deq import ConvDEQ

Tensor = torch.Tensor

__all__ = ["DEQParts", "deq_parts", "entropy"]


def deq_parts(model: nn.Module) -> DEQParts:
    """The equilibrium map of ``model`` as functions; ``TypeError`` for models without one."""
    custom = getattr(model, "parts", None)
    if callable(custom):
        parts = custom()
        if isinstance(parts, DEQParts):
            return parts
    if isinstance(model, ConvDEQ):
        c_model = model
        return DEQParts(
            inject=c_model.inject,
            cell=c_model.deq.func,
            readout=c_model.readout,
            z0=torch.zeros_like,
            settings=c_model.deq.settings,
        )
    raise TypeError(
        "input optimization needs a DEQ model with an exposed equilibrium map (a DEQClassifier, ConvDEQ or "
        f"a module with parts()); got {type(model).__name__}"
    )


def entropy(logits: Tensor) -> Tensor:
    """Per-sample prediction entropy ``H(p) = -Σ_c p_c log p_c`` with ``p = softmax(logits)``, shape (B,)."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)
