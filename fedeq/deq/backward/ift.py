"""``ift``: the exact implicit gradient through the adjoint fixed point ``g = J_fᵀ g + w``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fedeq.deq.backward.base import BackwardStats, HookBackward
from fedeq.deq.solvers import solve
from fedeq.registry import BACKWARDS

if TYPE_CHECKING:
    from fedeq.deq.layer import DEQSettings
    from fedeq.deq.solvers import SolverStats

Tensor = torch.Tensor


@BACKWARDS.register("ift")
class IFT(HookBackward):
    """With ``w = ∂L/∂z*`` the adjoint solves ``g = J_fᵀ g + w`` (fixed point, backward solver and budget,
    started from ``w``); then ``∂L/∂θ = (∂f/∂θ)ᵀ g``. Each iteration is one vector-Jacobian product through
    the graph of ``fz``, so the backward costs no extra evaluation of ``f``."""

    def hook(
        self, z_in: Tensor, fz: Tensor, forward: SolverStats, settings: DEQSettings, stats: BackwardStats
    ) -> Callable[[Tensor], Tensor]:
        busy = [False]

        def hook(w: Tensor) -> Tensor:
            if busy[0]:  # vector-Jacobian products below start at fz: leave their gradient alone
                return w
            busy[0] = True
            try:

                def adjoint(g: Tensor) -> Tensor:
                    return torch.autograd.grad(fz, z_in, g, retain_graph=True)[0] + w

                return solve_backward(adjoint, w, settings, stats)
            finally:
                busy[0] = False

        return hook


def solve_backward(
    adjoint: Callable[[Tensor], Tensor], w: Tensor, s: DEQSettings, bstats: BackwardStats
) -> Tensor:
    """Solve the adjoint fixed point ``g = adjoint(g)`` from ``w`` with the backward solver and budget of
    ``s``; its statistics go to ``bstats`` (which turns ``ready``)."""
    g, st = solve(
        adjoint, w, s.backward_solver, s.b_max_iter, s.backward_tol, s.stop_mode, **s.b_solver_options
    )
    bstats.nfe = int(st.nfe.max())
    bstats.sample_nfe = st.nfe
    bstats.abs_residual, bstats.rel_residual = st.abs_residual, st.rel_residual
    bstats.ready = True
    return g
