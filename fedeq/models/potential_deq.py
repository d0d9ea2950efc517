"""Potential DEQ: the DEQ cell is a gradient step on a learned strongly convex potential; orthogonal head.

Not LyaDEQ (Chu et al.; that model is :mod:`fedeq.models.lyadeq`): here the dynamics *are* gradient descent
on ``V``, so the cell's Jacobian ``I - η∇²V`` is symmetric and no free cell is involved.

Potential. A partially input-convex network (convex in the state ``z``, arbitrary in the input ``x``):

    V(z; x) = ½ ||z - u||² + Σ_j a_j · softplus(w_jᵀ z + c_j),
    u = U x + b_u,   a = a_max · sigmoid(P u + b_a) ∈ (0, a_max)^k,   c = C u + b_c,   W = W̃ / ||W̃||₂ (k × d).

The ``z``-path weights ``a_j`` are non-negative and softplus is convex and non-decreasing, so ``V`` is
1-strongly convex in ``z`` with ``∇²V = I + Wᵀ diag(a ⊙ s(1 - s)) W ⪯ L I``, ``L = 1 + max_j a_j / 4``
(``s = sigmoid(Wz + c)``): ``V`` has a unique minimizer ``z*(x)``.

Dynamics. The DEQ cell is one gradient step of ``V`` with step ``η = ω / L`` (per sample, ``0 < ω < 2``):

    f(z; x) = z - η ∇V(z; x),      ∇V(z; x) = z - u + Wᵀ (a ⊙ sigmoid(W z + c)),

so the fixed point of ``f`` is ``z*(x)`` and ``V(z) - V(z*)`` is a Lyapunov function of the iteration
``z ← f(z)``: by the descent lemma ``V(f(z)) ≤ V(z) - (ω/L)(1 - ω/2) ||∇V(z)||²``, and ``f`` is a contraction
with factor ``max(1 - ω/L, ω - 1)``. Any solver of :func:`fedeq.deq.solve` and any
backward mode of :class:`fedeq.deq.layer.DEQ` applies, under the device's budgets.

Orthogonal head. ``logits = τ · Q z* + β`` with ``Q ∈ R^{C×d}`` having orthonormal rows and a learned scale
``τ = softplus(t) > 0``: class directions are mutually orthogonal, which separates the stable fixed points of
different classes. ``Q`` is a ``torch.nn.utils.parametrizations.orthogonal`` linear layer: the first rows of
the Cayley transform of the skew-symmetric part ``S`` of an unconstrained parameter, so
averaging the parameters of several clients in a federated round still gives an orthogonal ``Q``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from fedeq.deq import DEQ, DEQOutput
from fedeq.models.base import DEQParts, ModelOutput, config_value, flattened_size
from fedeq.registry import MODELS

Tensor = torch.Tensor
Context = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""``(u, a, c, W, η)`` of a batch: shapes (B, d), (B, k), (B, k), (k, d), (B,)."""


class PotentialCell(nn.Module):
    """``f(z; ctx) = z - η ∇V(z)`` (module docstring)."""

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        u, a, c, w, eta = ctx
        grad = z - u + (a * torch.sigmoid(z @ w.T + c)) @ w
        return z - eta[:, None] * grad


class PotentialDEQ(nn.Module):
    """DEQ whose cell is a gradient step on a learned strongly convex potential; orthogonal classifier.

    Args:
        in_features, num_classes: input size and number of classes (``num_classes ≤ hidden``).
        hidden: state width ``d``.
        icnn_width: number ``k`` of convex ridge units in ``V`` (default ``hidden``).
        a_max: bound on the ridge amplitudes (sets ``L ≤ 1 + a_max/4``).
        step_scale: ``ω ∈ (0, 2)``; the step is ``ω / L``.
        **deq_settings: fields of :class:`fedeq.deq.layer.DEQSettings` (solver, budgets, backward mode, ...).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        icnn_width: int | None = None,
        a_max: float = 4.0,
        step_scale: float = 1.0,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        if num_classes > hidden:
            raise ValueError(
                f"hidden must be >= num_classes for the orthogonal head (got {hidden} < {num_classes})"
            )
        if not 0 < step_scale < 2:
            raise ValueError(f"step_scale must be in (0, 2) (got {step_scale!r})")
        if not a_max > 0:
            raise ValueError(f"a_max must be > 0 (got {a_max!r})")
        k = icnn_width or hidden
        self.a_max = float(a_max)
        self.step_scale = float(step_scale)
        self.inject = nn.Linear(in_features, hidden)
        self.amp = nn.Linear(hidden, k)
        self.shift = nn.Linear(hidden, k)
        self.ridge = nn.Parameter(torch.randn(k, hidden) / hidden**0.5)
        self.deq = DEQ(PotentialCell(), **deq_settings)
        # The Cayley map is smooth in its parameter (householder, the default for wide matrices, is not);
        # without trivialization only the unconstrained parameter is stored (no base buffer to send).
        self.orth = orthogonal(
            nn.Linear(hidden, num_classes, bias=True), orthogonal_map="cayley", use_trivialization=False
        )
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def context(self, x: Tensor) -> Context:
        """The input-dependent quantities ``(u, a, c, W, η)`` of :class:`PotentialCell`."""
        u = self.inject(x.flatten(1))
        a = self.a_max * torch.sigmoid(self.amp(u))
        c = self.shift(u)
        w = self.ridge / torch.linalg.matrix_norm(self.ridge, ord=2).clamp_min(1e-12)
        lip = 1.0 + a.detach().amax(dim=1) / 4.0
        return u, a, c, w, self.step_scale / lip

    @staticmethod
    def lyapunov(z: Tensor, ctx: Context) -> Tensor:
        """``V(z; x)`` per sample, shape (B,)."""
        u, a, c, w, _ = ctx
        return 0.5 * (z - u).pow(2).sum(dim=1) + (a * F.softplus(z @ w.T + c)).sum(dim=1)

    @staticmethod
    def lyapunov_grad(z: Tensor, ctx: Context) -> Tensor:
        """``∇_z V(z; x)``, shape (B, d)."""
        u, a, c, w, _ = ctx
        return z - u + (a * torch.sigmoid(z @ w.T + c)) @ w

    def equilibrium(self, x: Tensor, **deq_overrides: Any) -> tuple[DEQOutput, Context]:
        ctx = self.context(x)
        out = self.deq(ctx, torch.zeros_like(ctx[0]), **deq_overrides)
        return out, ctx

    def classify(self, z: Tensor) -> Tensor:
        """``τ · Q z + β``."""
        return F.softplus(self.log_scale) * F.linear(z, self.orth.weight) + self.orth.bias

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        out, _ = self.equilibrium(x, **deq_overrides)
        return ModelOutput(self.classify(out.z), out)

    def parts(self) -> DEQParts:
        """The equilibrium map as functions (input optimization, random intermediate states)."""
        return DEQParts(
            self.context,
            self.deq.func,
            self.classify,
            lambda ctx: torch.zeros_like(ctx[0]),
            self.deq.settings,
        )


@MODELS.register("potential_deq")
def build_potential_deq(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory: ``hidden`` from ``cfg`` (default 64)."""
    hidden = int(config_value(cfg, "hidden", 64))
    return PotentialDEQ(int(flattened_size(input_shape)), num_classes, hidden=hidden)
