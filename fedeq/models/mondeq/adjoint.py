"""The implicit gradient of MON-DEQ, solved with the same operator splitting as the forward pass.

With ``y = W z* + U x + b``, ``D = diag(relu'(y))`` and ``w = ∂ℓ/∂z*``, the gradient with respect to ``y``
is ``x = D (I - Wᵀ D)⁻¹ w``: the unique solution of the monotone inclusion

    0 ∈ (I - Wᵀ) x + ∂f̃(x),      f̃(x) = ½ xᵀ(D⁻¹ - I) x - wᵀx      (x_i = 0 where D_ii = 0),

solved with the *same* splitting under the backward budget: ``prox_{αf̃}(v) = D(v + αw) / (D + α(I - D))``
and resolvent ``(I + α(I - Wᵀ))⁻¹``, the transpose of the forward one. Then ``∂ℓ/∂θ = (∂y/∂θ)ᵀ x``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedeq.deq import DEQSettings
from fedeq.deq.backward import solve_backward
from fedeq.models.mondeq.operators import Operator, as_operator
from fedeq.models.mondeq.splitting import check_splitting

Tensor = torch.Tensor

__all__ = ["ImplicitRelu", "adjoint_map"]


def adjoint_map(W: Tensor | Operator, d: Tensor, w: Tensor, splitting: str, alpha: float) -> tuple[Any, Any]:
    """The backward map on the adjoint state and its read-out ``x = P(s)`` (``x`` = gradient w.r.t. ``y``).

    ``d`` holds the activation derivatives ``relu'(y) ∈ [0, 1]``; ``w`` the incoming gradient ``∂ℓ/∂z*``.
    """
    check_splitting(splitting)
    op = as_operator(W)
    denom = d + alpha * (1 - d)

    def prox(v: Tensor) -> Tensor:
        return d * (v + alpha * w) / denom

    if splitting == "fb":

        def T_fb(x: Tensor) -> Tensor:
            return prox(torch.lerp(x, op.apply_t(x), alpha))

        return T_fb, (lambda x: x)
    _, solve_rt = op.resolvent(alpha)

    def T_pr(u: Tensor) -> Tensor:
        v = 2 * prox(u) - u
        return 2 * solve_rt(v) - v

    return T_pr, prox


class ImplicitRelu(torch.autograd.Function):
    """Value ``relu(y)``; gradient ``x`` of the adjoint inclusion solved by splitting (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, op: Operator, settings: DEQSettings, split: tuple, bstats: Any
    ) -> Tensor:
        ctx.save_for_backward(y.detach())
        ctx.op, ctx.settings, ctx.split, ctx.bstats = op, settings, split, bstats
        return F.relu(y)

    @staticmethod
    def backward(ctx: Any, w: Tensor) -> tuple[Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        s: DEQSettings = ctx.settings
        splitting, alpha = ctx.split
        with torch.no_grad():
            d = (y > 0).to(w.dtype)
            T, read = adjoint_map(ctx.op, d, w, splitting, alpha)
            x = read(solve_backward(T, torch.zeros_like(w), s, ctx.bstats))
        return x, None, None, None, None
