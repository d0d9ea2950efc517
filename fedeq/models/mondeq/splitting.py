"""Operator splitting: the forward fixed-point map of MON-DEQ and the solve built on it.

Each method is a fixed-point map ``T`` on a state ``s`` with ``z* = P(s*)``; one application of ``T`` is
one function evaluation in the convention of :func:`fedeq.deq.solve`:

- forward-backward (``fb``), state ``z``:  ``T(z) = relu(z - α((I - W) z - (U x + b)))``. Converges for
  ``0 < α < 2m/L²``; the default ``α = m/L²`` minimizes the classical bound ``√(1 - 2αm + α²L²)``.
- Peaceman-Rachford (``pr``), state ``u``:  ``T(u) = 2 R(2 relu(u) - u) - (2 relu(u) - u)`` with the exact
  resolvent ``R(v) = (I + α(I - W))⁻¹ (v + α(U x + b))`` (a dense inverse, computed once per call), and
  ``z* = relu(u*)``. Converges for every ``α > 0`` (default 1, as in the reference experiments).

The ``fb`` bound ``α < 2m/L²`` is sufficient, not necessary, and ``m/L²`` shrinks fast in training (about
0.003 after two epochs on digits with ``m = 0.1``, too small to converge in 500 steps). The default ``fb``
step is therefore the fixed :data:`FB_ALPHA` = 0.25: the reference experiments search the step size during
training (:func:`tune_alpha`: halve from 1 while the iteration count does not grow), and that search settles
on 0.5 or 0.25 for the ``m = 1`` models here, 0.25 once ``||I - W||`` has grown in training (0.5 then leaves
samples unconverged). ``α`` can always be given explicitly or searched with :func:`tune_alpha`.

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

__all__ = [
    "FB_ALPHA",
    "SPLITTINGS",
    "check_splitting",
    "default_alpha",
    "monotone_solve",
    "splitting_map",
    "splitting_solve",
    "tune_alpha",
]

SPLITTINGS: tuple[str, ...] = ("fb", "pr")
#: Default forward-backward step size (module docstring).
FB_ALPHA = 0.25


def check_splitting(splitting: str) -> None:
    """``ValueError`` unless ``splitting`` is one of :data:`SPLITTINGS`."""
    if splitting not in SPLITTINGS:
        raise ValueError(f"splitting must be one of {', '.join(SPLITTINGS)} (got {splitting!r})")


def default_alpha(W: Tensor | Operator, splitting: str, margin: float) -> float:
    """Default step size: :data:`FB_ALPHA` for ``fb``, ``1`` for ``pr`` (``W`` and ``margin`` are unused and
    kept for callers that compute the bound ``m / ||I - W||₂²`` themselves)."""
    check_splitting(splitting)
    return 1.0 if splitting == "pr" else FB_ALPHA


def tune_alpha(
    W: Tensor | Operator,
    inj: Tensor,
    splitting: str,
    max_alpha: float = 1.0,
    max_iter: int = 300,
    tol: float = 1e-2,
    min_alpha: float = 1e-4,
) -> tuple[float, int]:
    """Step-size search of the reference experiments: from ``max_alpha``, halve ``α`` while the number of
    plain splitting iterations to ``tol`` on the batch ``inj`` does not grow; returns ``(α, iterations)``
    (``max_alpha`` when no step size converges)."""
    best = (max_alpha, _iterations(W, inj, splitting, max_alpha, max_iter, tol))
    alpha = max_alpha / 2
    while alpha >= min_alpha:
        its = _iterations(W, inj, splitting, alpha, max_iter, tol)
        if its > best[1]:
            break
        best = (alpha, its)
        alpha /= 2
    return best


def _iterations(
    W: Tensor | Operator, inj: Tensor, splitting: str, alpha: float, max_iter: int, tol: float
) -> int:
    _, st = splitting_solve(W, inj, splitting=splitting, alpha=alpha, max_iter=max_iter, tol=tol)
    return int(st.nfe.max()) if bool(st.converged.all()) else max_iter + 1


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

    ``margin`` is accepted for compatibility and unused. ``stats.extra`` holds ``splitting`` and ``alpha``.
    """
    s, stats = splitting_solve(
        W,
        inj,
        z0,
        splitting=splitting,
        alpha=alpha,
        solver=solver,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        **solver_options,
    )
    alpha = stats.extra["alpha"]
    return splitting_map(as_operator(W), inj, splitting, alpha)[1](s), stats


def splitting_solve(
    W: Tensor | Operator,
    inj: Tensor,
    s0: Tensor | None = None,
    *,
    splitting: str = "pr",
    alpha: float | None = None,
    solver: str = "fixed_point",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **solver_options: Any,
) -> tuple[Tensor, SolverStats]:
    """The fixed point ``s*`` of the splitting map (the *state*, ``z* = P(s*)``) and its statistics."""
    with torch.no_grad():
        op = as_operator(W)
        if alpha is None:
            alpha = default_alpha(op, splitting, 1.0)
        T, _ = splitting_map(op, inj, splitting, alpha)
        s0 = torch.zeros_like(inj) if s0 is None else s0
        s, stats = solve(T, s0, solver, max_iter, tol, stop_mode, **solver_options)
        stats.extra.update(splitting=splitting, alpha=alpha)
        return s, stats
