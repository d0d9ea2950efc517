"""Input problems through an equilibrium: ``min_{x ∈ C} ℓ(z*, x)`` with ``z* = f(z*, x)``.

With the adjoint ``λ`` and any step ``α > 0`` the first-order optimality conditions are

    z = f(z, x)                                   (equilibrium)
    λ = J_z(z, x)ᵀ λ + ∂ℓ/∂z(z, x)                 (adjoint, J_z = ∂f/∂z)
    x = Proj_C(x - α (∂ℓ/∂x(z, x) + J_x(z, x)ᵀ λ))  (projected-gradient stationarity, J_x = ∂f/∂x)

since ``d/dx ℓ(z*(x), x) = ∂ℓ/∂x + J_xᵀ (I - J_zᵀ)^{-1} ∂ℓ/∂z``. :func:`evaluate` computes all right-hand
sides at a point from one evaluation of ``f`` and one vector-Jacobian product; :func:`stationarity` turns
them into the three residuals. The solvers are :func:`fedeq.robust.jiio.jiio` (joint iteration) and
:func:`fedeq.robust.naive.naive_input_optimization` (full solves per gradient step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

__all__ = ["Evaluation", "InputProblem", "JIIOResult", "Residuals", "evaluate", "stationarity"]

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
    residuals: Residuals | None
    """The three residuals at the returned point (``None`` when not requested)."""
    iterations: int
    """Outer iterations (JIIO: joint updates; naive: gradient steps)."""
    f_evals: int
    """Evaluations of ``f`` on the batch (with or without a graph)."""
    vjps: int
    """Vector-Jacobian products of ``f`` on the batch."""
    time_s: float
    history: list[tuple[float, int, Tensor]] | None = None
    """``(elapsed seconds, f_evals so far, x)`` after every iteration when requested."""
    objective: Tensor | None = None
    """``ℓ(z, x)`` per sample at the last point the iteration evaluated (JIIO)."""


@dataclass
class Evaluation:
    """The right-hand sides of the optimality conditions at one point ``(z, λ, x)``."""

    fz: Tensor
    """``f(z, x)``."""
    lam: Tensor
    """``J_zᵀλ + ∂ℓ/∂z``."""
    grad_x: Tensor
    """``∂ℓ/∂x + J_xᵀλ`` (the input gradient once ``z`` and ``λ`` are at their fixed points)."""
    objective: Tensor
    """``ℓ(z, x)``."""


def bview(a: Tensor | float, like: Tensor) -> Tensor | float:
    """A per-sample (B,) tensor shaped to broadcast over ``like``; floats pass through."""
    if isinstance(a, Tensor) and a.dim() == 1:
        return a.reshape(-1, *([1] * (like.dim() - 1)))
    return a


def evaluate(problem: InputProblem, z: Tensor, lam: Tensor, x: Tensor) -> Evaluation:
    """All right-hand sides at ``(z, λ, x)`` from one ``f`` call and one backward pass."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        xr = x.detach().requires_grad_(True)
        fz = problem.f(zr, xr)
        obj = problem.objective(zr, xr)
        total = obj.sum() + (fz * lam.detach()).sum()
        gz, gx = torch.autograd.grad(total, (zr, xr), allow_unused=True)
    gz = torch.zeros_like(z) if gz is None else gz
    gx = torch.zeros_like(x) if gx is None else gx
    return Evaluation(fz.detach(), gz.detach(), gx.detach(), obj.detach())


def rel_norm(a: Tensor, ref: Tensor) -> Tensor:
    """``||a_i|| / ||ref_i||`` per sample."""
    return a.flatten(1).norm(dim=1) / (ref.flatten(1).norm(dim=1) + _EPS)


def stationarity(
    problem: InputProblem, z: Tensor, lam: Tensor, x: Tensor, alpha: Tensor | float
) -> Residuals:
    """The three first-order residuals of the input problem at ``(z, λ, x)`` (see the module docstring)."""
    ev = evaluate(problem, z, lam, x)
    x_new = problem.proj(x.detach() - bview(alpha, x) * ev.grad_x)
    a = alpha if isinstance(alpha, Tensor) else torch.full((x.shape[0],), float(alpha), device=x.device)
    gm = (x - x_new).flatten(1).norm(dim=1) / a.to(x.dtype)
    return Residuals(rel_norm(ev.fz - z, ev.fz), rel_norm(ev.lam - lam, ev.lam), gm, ev.objective)
