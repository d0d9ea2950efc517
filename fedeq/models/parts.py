"""The equilibrium map of a fedeq model written as plain functions of the state and the input.

Input optimization (entropy-reducing input updates, JIIO) needs more than ``model(x)``: it evaluates the
cell ``f(z, x)`` at states of its own choosing and differentiates it with respect to ``z`` and ``x``. For a
model with input injection ``c = inject(x)``, cell ``z ↦ cell(z, c)`` and readout ``logits = readout(z)``:

    f(z, x) = cell(z, inject(x)),    z* = f(z*, x),    logits = readout(z*).

:func:`deq_parts` returns these functions for every :class:`~fedeq.models.DEQClassifier` (such as
:class:`~fedeq.models.mlp_deq.MLPDEQ` and :class:`~fedeq.models.conv_deq.ConvDEQ`) and for any module exposing
a ``parts()`` method returning :class:`DEQParts`.
"""

from __future__ import annotations

import torch
from torch import nn

from fedeq.models.base import DEQParts

Tensor = torch.Tensor

__all__ = ["DEQParts", "deq_parts", "entropy"]


def deq_parts(model: nn.Module) -> DEQParts:
    """The equilibrium map of ``model`` as functions; ``TypeError`` for models without one."""
    custom = getattr(model, "parts", None)
    if callable(custom):
        parts = custom()
        if isinstance(parts, DEQParts):
            return parts
    raise TypeError(
        "input optimization needs a DEQ model with an exposed equilibrium map (a DEQClassifier or a module "
        f"with parts()); got {type(model).__name__}"
    )


def entropy(logits: Tensor) -> Tensor:
    """Per-sample prediction entropy ``H(p) = -Σ_c p_c log p_c`` with ``p = softmax(logits)``, shape (B,)."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)
