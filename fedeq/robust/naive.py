"""The naive loop for input problems: a full DEQ solve and a full adjoint solve before every gradient step.

For ``min_{x∈C} ℓ(z*(x), x)`` (:class:`~fedeq.robust.input_problem.InputProblem`) each projected gradient step
``x ← Proj_C(x - α ∇_x ℓ(z*(x), x))`` first solves ``z* = f(z*, x)`` and the adjoint ``λ = J_zᵀλ + ∂ℓ/∂z``
to tolerance, so each step costs a forward and a backward solve. The joint iteration
(:func:`fedeq.robust.jiio.jiio`) replaces the three nested solves by one fixed-point iteration.
"""

from __future__ import annotations

import time

import torch

from fedeq.deq.solvers import solve
from fedeq.robust.input_problem import InputProblem, JIIOResult, bview, stationarity

Tensor = torch.Tensor

__all__ = ["naive_input_optimization", "solve_objective", "solve_state_and_adjoint"]


def _solve_state(
    problem: InputProblem, x: Tensor, z0: Tensor, solver: str, max_iter: int, tol: float, stop_mode: str
) -> tuple[Tensor, int]:
    with torch.no_grad():
        z, st = solve(lambda z: problem.f(z, x), z0, solver, max_iter, tol, stop_mode)
    return z, int(st.nfe.max())


def _solve_adjoint(
    problem: InputProblem, z: Tensor, x: Tensor, solver: str, max_iter: int, tol: float, stop_mode: str
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``λ = J_zᵀλ + ∂ℓ/∂z`` solved to tolerance; returns ``(λ, ∇_x ℓ(z*(x), x), ℓ, vjps)``."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        xr = x.detach().requires_grad_(True)
        fz = problem.f(zr, xr)
        obj = problem.objective(zr, xr)
        dz, dx = torch.autograd.grad(obj.sum(), (zr, xr), retain_graph=True, allow_unused=True)
        dz = torch.zeros_like(z) if dz is None else dz
        dx = torch.zeros_like(x) if dx is None else dx

        def adjoint(g: Tensor) -> Tensor:
            return torch.autograd.grad(fz, zr, g, retain_graph=True)[0] + dz

        lam, st = solve(adjoint, dz, solver, max_iter, tol, stop_mode)
        (jx,) = torch.autograd.grad(fz, xr, lam, allow_unused=True)
    gx = dx + (torch.zeros_like(x) if jx is None else jx)
    return lam.detach(), gx.detach(), obj.detach(), int(st.nfe.max()) + 1


def naive_input_optimization(
    problem: InputProblem,
    x0: Tensor,
    step_size: Tensor | float,
    *,
    outer_steps: int = 50,
    solver: str = "anderson",
    f_max_iter: int = 50,
    b_max_iter: int = 50,
    tol: float = 1e-6,
    stop_mode: str = "abs",
    warm_start: bool = False,
    x_tol: float = 0.0,
    record: bool = False,
) -> JIIOResult:
    """Projected gradient descent with a full DEQ solve and a full adjoint solve per step.

    ``x ← Proj(x - α ∇_x ℓ(z*(x), x))`` for ``outer_steps`` steps, or until every sample's gradient
    mapping ``||x - x_new|| / α`` is below ``x_tol``. ``warm_start`` starts each solve from the previous
    equilibrium instead of ``z_init``.
    """
    t0 = time.perf_counter()
    x = problem.proj(x0.detach())
    z_init = problem.initial_state(x)
    z = z_init
    f_evals = vjps = steps = 0
    history: list[tuple[float, int, Tensor]] | None = [] if record else None
    a = bview(step_size, x)
    lam = torch.zeros_like(z)
    for _ in range(outer_steps):
        z, nf = _solve_state(problem, x, z if warm_start else z_init, solver, f_max_iter, tol, stop_mode)
        lam, gx, _, nb = _solve_adjoint(problem, z, x, solver, b_max_iter, tol, stop_mode)
        f_evals += nf + 1
        vjps += nb
        x_new = problem.proj(x - a * gx)
        steps += 1
        gm = (x_new - x).flatten(1).norm(dim=1) / torch.as_tensor(step_size, dtype=x.dtype)
        x = x_new
        if history is not None:
            history.append((time.perf_counter() - t0, f_evals, x.clone()))
        if x_tol > 0 and float(gm.max()) <= x_tol:
            break
    z, nf = _solve_state(problem, x, z if warm_start else z_init, solver, f_max_iter, tol, stop_mode)
    lam, _, _, nb = _solve_adjoint(problem, z, x, solver, b_max_iter, tol, stop_mode)
    f_evals += nf + 1
    vjps += nb
    elapsed = time.perf_counter() - t0
    res = stationarity(problem, z, lam, x, step_size)
    return JIIOResult(x, z, lam, res, steps, f_evals, vjps, elapsed, history)


def solve_state_and_adjoint(
    problem: InputProblem,
    x: Tensor,
    *,
    solver: str = "anderson",
    f_max_iter: int = 100,
    b_max_iter: int = 100,
    tol: float = 1e-7,
    stop_mode: str = "abs",
    b_solver: str | None = None,
    b_tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``(z*, λ*, ∇_x ℓ(z*(x), x), f evaluations, VJPs)`` from a full forward and a full adjoint solve."""
    z, nf = _solve_state(problem, x, problem.initial_state(x), solver, f_max_iter, tol, stop_mode)
    lam, gx, _, nb = _solve_adjoint(
        problem, z, x, b_solver or solver, b_max_iter, tol if b_tol is None else b_tol, stop_mode
    )
    return z, lam, gx, nf + 1, nb


def solve_objective(
    problem: InputProblem,
    x: Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 100,
    tol: float = 1e-7,
) -> Tensor:
    """``ℓ(z*(x), x)`` per sample with the equilibrium solved to ``tol`` (for comparing methods)."""
    z, _ = _solve_state(problem, x, problem.initial_state(x), solver, max_iter, tol, "abs")
    with torch.no_grad():
        return problem.objective(z, x)
