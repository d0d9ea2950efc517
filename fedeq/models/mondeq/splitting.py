"""Operator splitting: the forward fixed-point map of MON-DEQ and the solve built on it.

Each method is a fixed-point map ``T`` on a state ``s`` with ``z* = P(s*)``; one application of ``T`` is
one function evaluation in the convention of :func:`fedeq.deq.solve`:

- forward-backward (``fb``), state ``z``:  ``T(z) = relu(z - α((I - W) z - (U x + b)))``. Converges for
  ``0 < α < 2m/L²``; the default ``α = m/L²`` minimizes the classical bound ``√(1 - 2αm + α²L²)``.
- Peaceman-Rachford (``pr``), state ``u``:  ``T(u) = 2 R(2 relu(u) - u) - (2 relu(u) - u)`` with the exact
  resolvent ``R(v) = (I + α(I - W))⁻¹ (v + α(U x + b))`` (a dense inverse, computed once per call), and
  ``z* = relu(u*)``. Converges for every ``α > 0`` (default 1).

The device tier's ``solver`` is applied to ``T``: ``fixed_point`` runs the plain splitting iteration of the
paper, ``anderson``/``broyden`` accelerate it; budgets, tolerances and per-sample statistics follow
:func:`fedeq.deq.solve` exactly (``nfe`` counts applications of ``T``, residual ``||T(s) - s||``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedeq.deq import SolverStats, solve
from fedeq.models.mondeq.operators import Operator, as_operator

Tensor = torch.Tensor

__all__ = ["SPLITTINGS", "check_splitting", "default_alpha", "monotone_solve", "splitting_map"]

SPLITTINGS: tuple[str, ...] = ("fb", "pr")


def check_splitting(splitting: str) -> None:
    """``ValueError`` unless ``splitting`` is one of :data:`SPLITTINGS`."""
    if splitting not in SPLITTINGS:
        raise ValueError(f"splitting must be one of {', '.join(SPLITTINGS)} (got {splitting!r})")


def default_alpha(W: Tensor | Operator, splitting: str, margin: float) -> float:
    """Step size: ``m / ||I - W||₂²`` for ``fb``, ``1`` for ``pr``."""
    check_splitting(splitting)
    if splitting == "pr":
        return 1.0
    lip = float(as_operator(W).lipschitz())
    return float(margin) / max(lip * lip, 1e-12)


def splitting_map(W: Tensor | Operator, inj: Tensor, splitting: str, alpha: float) -> tuple[Any, Any]:
    """The forward map ``T`` on the splitting state and the read-out ``P`` with ``z = P(s)``.

    A dense ``W`` acts on row vectors: states have shape (batch, d) and ``W z`` is ``z @ Wᵀ``.
    """
    check_splitting(splitting)
    op = as_operator(W)
    if splitting == "fb":

        def T_fb(z: Tensor) -> Tensor:
            return F.relu(torch.lerp(z, op.apply(z) + inj, alpha))

        return T_fb, (lambda z: z)
    solve_r, _ = op.resolvent(alpha)
    a_inj = alpha * inj

    def T_pr(u: Tensor) -> Tensor:
        v = 2 * F.relu(u) - u
        return 2 * solve_r(v + a_inj) - v

    return T_pr, F.relu


def monotone_solve(
    W: Tensor | Operator,
    inj: Tensor,
    z0: Tensor | None = None,
    *,
    splitting: str = "pr",
    alpha: float | None = None,
    margin: float | None = None,
    solver: str = "fixed_point",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **solver_options: Any,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = relu(W z + inj)`` by operator splitting; returns ``(z*, stats)`` (no gradient).

    ``margin`` (the monotonicity parameter ``m``) is needed only for the default ``fb`` step size.
    ``stats.extra`` holds ``splitting`` and ``alpha``.
    """
    with torch.no_grad():
        op = as_operator(W)
        if alpha is None:
            alpha = default_alpha(op, splitting, margin if margin is not None else float(op.margin()))
        T, read = splitting_map(op, inj, splitting, alpha)
        s0 = torch.zeros_like(inj) if z0 is None else z0
        s, stats = solve(T, s0, solver, max_iter, tol, stop_mode, **solver_options)
        stats.extra.update(splitting=splitting, alpha=alpha)
        return read(s), stats
