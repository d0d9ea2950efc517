""":class:`DEQClassifier`: the base class of a DEQ classifier, so that a new model is mostly its cell.

A DEQ classifier has four parts::

    c = injection(x)               input injection, computed once per call
    z* = cell(z*, c)               the equilibrium, found from z0 = init_state(c)
    logits = readout(z*)

A subclass writes :meth:`~DEQClassifier.cell` and, when the defaults do not fit, the other three
methods. The base class owns the :class:`~fedeq.deq.DEQ` layer (``self.deq``): its solver, budgets and
backward mode come from the constructor's ``deq_settings`` (set by :func:`~fedeq.models.build_model`)
and, per call, from the overrides that ``forward(x, **deq_overrides)`` receives (a device tier's
settings in a federated run). :meth:`~DEQClassifier.parts` exposes the same four parts to input
optimization (JIIO, entropy-reducing input updates). ``forward(x, targets=y)`` also hands the DEQ the
loss gradient at its iterates, for the outer-problem-aware updates of ``reuse_opa_every``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq import DEQ
from fedeq.models.base import DEQParts, ModelOutput

Tensor = torch.Tensor

__all__ = ["DEQClassifier"]


class DEQClassifier(nn.Module):
    """Base class of DEQ classifiers: ``logits = readout(z*)`` with ``z* = cell(z*, injection(x))``.

    Args:
        input_shape, num_classes, width: with ``width``, the base creates the default injection
            ``self.inject`` (a linear map of the flattened input to ``width`` features) and the default
            readout ``self.head`` (a linear map of ``z*`` to the logits). Without ``width`` the subclass
            overrides :meth:`injection` and :meth:`readout` (or creates ``inject`` and ``head`` itself).
        **deq_settings: defaults of the DEQ layer (fields of :class:`~fedeq.deq.DEQSettings`).

    Override the methods, never assign modules under their names: keep a cell's layers under other
    attribute names (``self.lin``, ``self.norm``) and use them in :meth:`cell`.

    ``supports_cohorts``: the four parts are functions of their inputs, weights and buffers only (no random
    draws, ``.item()`` or data-dependent Python branches), so many clients train at once under ``vmap``
    (:mod:`fedeq.train.cohort_model`); a subclass whose parts are not sets it to ``False``.
    """

    supports_cohorts: ClassVar[bool] = True

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        width: int | None = None,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        if width is not None:
            if input_shape is None or num_classes is None:
                raise ValueError("DEQClassifier: width needs input_shape and num_classes for the defaults")
            self.inject = nn.Linear(math.prod(input_shape), width)
            self.head = nn.Linear(width, num_classes)
        self.deq = DEQ(self.cell, **deq_settings)

    def injection(self, x: Tensor) -> Any:
        """``c = injection(x)``, computed once per call; default ``self.inject(x.flatten(1))``."""
        inject = self._modules.get("inject")
        if inject is None:
            raise NotImplementedError(f"{type(self).__name__}: pass width= or override injection(x)")
        return inject(x.flatten(1))

    def cell(self, z: Tensor, c: Any) -> Tensor:
        """The equilibrium map ``z ↦ cell(z, c)``: the one method every subclass writes."""
        raise NotImplementedError(f"{type(self).__name__} must define cell(z, c)")

    def init_state(self, c: Any) -> Tensor:
        """The solver's initial state ``z0``; default zeros shaped like ``c``."""
        return torch.zeros_like(c)

    def readout(self, z: Tensor) -> Tensor:
        """The logits of the equilibrium; default ``self.head(z)``."""
        head = self._modules.get("head")
        if head is None:
            raise NotImplementedError(f"{type(self).__name__}: pass width= or override readout(z)")
        return head(z)

    def forward(self, x: Tensor, targets: Tensor | None = None, **deq_overrides: Any) -> ModelOutput:
        """Logits and the DEQ statistics; ``deq_overrides`` (solver, budgets, backward, ...) apply to
        this call only. ``targets`` (class indices) serve only ``reuse_opa_every``: the DEQ's forward solve
        then receives the cross-entropy gradient at its iterates (:meth:`outer_gradient`)."""
        c = self.injection(x)
        outer = None if targets is None else self.outer_gradient(targets)
        out = self.deq(c, self.init_state(c), outer_grad=outer, **deq_overrides)
        return ModelOutput(self.readout(out.z), out)

    def outer_gradient(self, targets: Tensor) -> Callable[[Tensor], Tensor]:
        """``z ↦ ∂/∂z Σ_b CE(readout(z)_b, targets_b)``: each sample's cross-entropy gradient at an
        iterate, through the readout, with no graph kept to the parameters. The readout must have no side
        effects (no running statistics, no dropout): it runs once more per outer-problem-aware update."""

        def grad(z: Tensor) -> Tensor:
            with torch.enable_grad():
                z_in = z.detach().requires_grad_(True)
                loss = F.cross_entropy(self.readout(z_in), targets, reduction="sum")
                return torch.autograd.grad(loss, z_in)[0]

        return grad

    def parts(self) -> DEQParts:
        """The four parts as functions, for input optimization (:func:`fedeq.models.parts.deq_parts`)."""
        return DEQParts(
            inject=self.injection,
            cell=self.deq.func,
            readout=self.readout,
            z0=self.init_state,
            settings=self.deq.settings,
        )
