"""Joint inference and input optimization (JIIO) for DEQs.

The input problem, per sample::

    min_{x ∈ C}  ℓ(z*, x)    subject to    z* = f(z*, x).

Its first-order optimality conditions, with the adjoint ``λ`` and any step ``α > 0``, are

    z = f(z, x)                                   (equilibrium)
    λ = J_z(z, x)ᵀ λ + ∂ℓ/∂z(z, x)                 (adjoint, J_z = ∂f/∂z)
    x = Proj_C(x - α (∂ℓ/∂x(z, x) + J_x(z, x)ᵀ λ))  (projected-gradient stationarity, J_x = ∂f/∂x)

since ``d/dx ℓ(z*(x), x) = ∂ℓ/∂x + J_xᵀ (I - J_zᵀ)^{-1} ∂ℓ/∂z``. JIIO iterates the augmented map

    T(z, λ, x) = ( f(z, x),  J_zᵀ λ + ∂ℓ/∂z,  Proj_C(x - α (∂ℓ/∂x + J_xᵀ λ)) )

jointly, all terms evaluated at the current ``(z, λ, x)``: one evaluation of ``f`` and one vector-Jacobian
product (for both ``J_zᵀλ`` and ``J_xᵀλ``) per iteration. Its fixed points are exactly the points that
satisfy the three conditions above. The stacked state can be driven by plain iteration (``fixed_point``,
optionally damped) or by Anderson acceleration (``anderson``), both from :mod:`fedeq.deq.solvers`.

The *naive loop* (:func:`naive_input_optimization`) solves the equilibrium and the adjoint to tolerance
before every projected gradient step, so each step costs a full forward and backward solve.

:func:`stationarity` reports the three residuals at a point; :func:`jiio_attack` uses JIIO for PGD-style
attacks on fedeq classifiers (maximise the cross-entropy over the ε-ball).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq.solvers import solve
from fedeq.models.parts import deq_parts
from fedeq.robust.attacks import AttackConfig, AttackResult
from fedeq.robust.ball import project, random_start

Tensor = torch.Tensor

__all__ = [
    "InputProblem",
    "JIIOResult",
    "Residuals",
    "augmented_map",
    "jiio",
    "jiio_attack",
    "naive_input_optimization",
    "solve_objective",
    "solve_state_and_adjoint",
    "stationarity",
]

_EPS = 1e-12


@dataclass
class InputProblem:
    """``min_{x∈C} ℓ(z*, x)`` with ``z* = f(z*, x)``; all callables act per sample on a batch.

    ``objective(z, x)`` returns shape (B,); ``z_init(x)`` gives the initial state; ``project`` is
    ``Proj_C`` (identity when ``None``).
    """

    f: Callable[[Tensor, Tensor], Tensor]
    objective: Callable[[Tensor, Tensor], Tensor]
    z_init: Callable[[Tensor], Tensor]
    project: Callable[[Tensor], Tensor] | None = None

    def proj(self, x: Tensor) -> Tensor:
        return x if self.project is None else self.project(x)

    def initial_state(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.z_init(x).detach()


@dataclass
class Residuals:
    """Per-sample optimality residuals at ``(z, λ, x)`` (shape (B,) each)."""

    equilibrium: Tensor
    """``||f(z, x) - z|| / ||f(z, x)||``."""
    adjoint: Tensor
    """``||J_zᵀλ + ∂ℓ/∂z - λ|| / ||J_zᵀλ + ∂ℓ/∂z||``."""
    gradient_mapping: Tensor
    """``||x - Proj_C(x - α ∇_x)|| / α`` (the norm of the projected gradient; 0 at a stationary point)."""
    objective: Tensor
    """``ℓ(z, x)``."""

    def summary(self) -> dict[str, float]:
        return {k: float(v.max()) for k, v in self.__dict__.items() if k != "objective"} | {
            "objective": float(self.objective.mean())
        }


@dataclass
class JIIOResult:
    """Solution of an input problem and what it cost."""

    x: Tensor
    z: Tensor
    lam: Tensor
    residuals: Residuals
    iterations: int
    """Outer iterations (JIIO: evaluations of the augmented map; naive: gradient steps)."""
    f_evals: int
    """Evaluations of ``f`` on the batch (with or without a graph)."""
    vjps: int
    """Vector-Jacobian products of ``f`` on the batch."""
    time_s: float
    history: list[tuple[float, int, Tensor]] | None = None
    """``(elapsed seconds, f_evals so far, x)`` after every iteration when requested."""


def _bview(a: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(a, Tensor) and a.dim() == 1:
        return a.reshape(-1, *([1] * (like.dim() - 1)))
    return a


def _evaluate(
    problem: InputProblem, z: Tensor, lam: Tensor, x: Tensor, alpha: Tensor | float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(f(z,x), J_zᵀλ + ∂ℓ/∂z, Proj(x - α∇_x), ∇_x, ℓ(z,x))`` from one ``f`` call and one backward pass."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        xr = x.detach().requires_grad_(True)
        fz = problem.f(zr, xr)
        obj = problem.objective(zr, xr)
        total = obj.sum() + (fz * lam.detach()).sum()
        gz, gx = torch.autograd.grad(total, (zr, xr), allow_unused=True)
    gz = torch.zeros_like(z) if gz is None else gz
    gx = torch.zeros_like(x) if gx is None else gx
    x_new = problem.proj(x.detach() - _bview(alpha, x) * gx)
    return fz.detach(), gz.detach(), x_new.detach(), gx.detach(), obj.detach()


def _rel(a: Tensor, ref: Tensor) -> Tensor:
    return a.flatten(1).norm(dim=1) / (ref.flatten(1).norm(dim=1) + _EPS)


def stationarity(
    problem: InputProblem, z: Tensor, lam: Tensor, x: Tensor, alpha: Tensor | float
) -> Residuals:
    """The three first-order residuals of the input problem at ``(z, λ, x)`` (see the module docstring)."""
    fz, lam_new, x_new, _, obj = _evaluate(problem, z, lam, x, alpha)
    a = alpha if isinstance(alpha, Tensor) else torch.full((x.shape[0],), float(alpha), device=x.device)
    gm = (x - x_new).flatten(1).norm(dim=1) / a.to(x.dtype)
    return Residuals(_rel(fz - z, fz), _rel(lam_new - lam, lam_new), gm, obj)


def augmented_map(
    problem: InputProblem,
    shapes: tuple[torch.Size, torch.Size],
    alpha: Tensor | float,
    history: list[tuple[float, int, Tensor]] | None = None,
    t0: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """``T`` on the stacked, flattened state ``s = [z, λ, x]`` of shape (B, 2·d_z + d_x)."""
    z_shape, x_shape = shapes
    count = [0]

    def T(s: Tensor) -> Tensor:
        z, lam, x = _split(s, z_shape, x_shape)
        fz, lam_new, x_new, _, _ = _evaluate(problem, z, lam, x, alpha)
        count[0] += 1
        if history is not None:
            history.append((time.perf_counter() - t0, count[0], x_new.clone()))
        return _stack(fz, lam_new, x_new)

    return T


def _stack(z: Tensor, lam: Tensor, x: Tensor) -> Tensor:
    """The stacked, flattened state ``[z, λ, x]`` (inverse of :func:`_split`)."""
    b = x.shape[0]
    return torch.cat([z.reshape(b, -1), lam.reshape(b, -1), x.reshape(b, -1)], dim=1)


def _split(s: Tensor, z_shape: torch.Size, x_shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
    dz = int(torch.Size(z_shape[1:]).numel())
    return s[:, :dz].reshape(z_shape), s[:, dz : 2 * dz].reshape(z_shape), s[:, 2 * dz :].reshape(x_shape)


def jiio(
    problem: InputProblem,
    x0: Tensor,
    step_size: Tensor | float,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    stop_mode: str = "abs",
    solver: str = "fixed_point",
    z0: Tensor | None = None,
    lam0: Tensor | None = None,
    record: bool = False,
    **solver_options: Any,
) -> JIIOResult:
    """Solve the input problem with the joint iteration ``T`` (module docstring) from ``(z0, λ0, Proj(x0))``.

    ``step_size`` is ``α`` (a float or one value per sample); ``solver`` is ``fixed_point`` (with optional
    ``damping``) or ``anderson`` (``m``, ``beta``, ...) acting on the stacked state; ``max_iter`` counts
    evaluations of ``T`` (one ``f`` and one VJP each) and ``tol`` bounds ``||T(s) - s||``.
    """
    t0 = time.perf_counter()
    x0 = problem.proj(x0.detach())
    z_start = problem.initial_state(x0) if z0 is None else z0.detach()
    lam_start = torch.zeros_like(z_start) if lam0 is None else lam0.detach()
    s0 = _stack(z_start, lam_start, x0)
    history: list[tuple[float, int, Tensor]] | None = [] if record else None
    T = augmented_map(problem, (z_start.shape, x0.shape), step_size, history, t0)
    s, stats = solve(T, s0, solver, max_iter, tol, stop_mode, **solver_options)
    elapsed = time.perf_counter() - t0
    z, lam, x = _split(s, z_start.shape, x0.shape)
    n = int(stats.nfe.max())
    res = stationarity(problem, z, lam, x, step_size)
    return JIIOResult(x, z, lam, res, n, n, n, elapsed, history)


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
    a = _bview(step_size, x)
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


def jiio_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AttackConfig,
    *,
    deq: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Maximise the cross-entropy over ``B_ε(x) ∩ [lo, hi]`` with JIIO (``cfg.kind == "jiio"``).

    Objective ``ℓ(z, x') = -CE(readout(z), y)``; ``Proj`` clips to the L∞ box (exact) or scales into the
    L2 ball then clips to the data range. The state and adjoint start from one full forward and adjoint
    solve at the start point (forward/backward budgets from ``deq`` or the model); that solve also sets
    the per-sample step ``α_i = s·ε / mean_j |∇_{x'} L_i|`` with ``s = cfg.step_size`` (default 0.25).
    ``cfg.steps`` evaluations of the augmented map follow; ``cfg.options`` may set ``solver`` (default
    ``fixed_point``) and solver options (``damping``, ``m``, ...).
    """
    parts = deq_parts(model)
    settings = parts.settings.override(**dict(deq or {}))
    x0 = x.detach()
    lo, hi = cfg.clamp
    eps = float(cfg.epsilon)

    def proj(xv: Tensor) -> Tensor:
        return (x0 + project(xv - x0, eps, cfg.norm)).clamp(lo, hi)

    def objective(z: Tensor, _xv: Tensor) -> Tensor:
        return -F.cross_entropy(parts.readout(z), y, reduction="none")

    problem = InputProblem(parts.f, objective, lambda xv: parts.z0(parts.inject(xv)), proj)
    start = x0
    if cfg.random_start and eps > 0:
        start = proj(x0 + random_start(x0, eps, cfg.norm, generator))
    if eps == 0:
        return AttackResult(start, torch.zeros(x0.shape[0], device=x0.device))
    opts = dict(cfg.options)
    solver = opts.pop("solver", "fixed_point")
    tol = float(opts.pop("tol", 1e-8))
    z, lam, gx, nf, nb = solve_state_and_adjoint(
        problem,
        start,
        solver=settings.solver,
        f_max_iter=settings.f_max_iter,
        b_max_iter=settings.b_max_iter,
        tol=settings.tol,
        stop_mode=settings.stop_mode,
        b_solver=settings.backward_solver,
        b_tol=settings.backward_tol,
    )
    rel = 0.25 if cfg.step_size is None else float(cfg.step_size)
    alpha = rel * eps / gx.flatten(1).abs().mean(dim=1).clamp_min(_EPS)
    res = jiio(problem, start, alpha, max_iter=cfg.steps, tol=tol, solver=solver, z0=z, lam0=lam, **opts)
    return AttackResult(
        res.x.detach(),
        -res.residuals.objective,
        nfe_fwd=float(nf + res.f_evals),
        nfe_bwd=float(nb + res.vjps),
    )
