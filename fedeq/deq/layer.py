"""The implicit (DEQ) layer: a fixed-point solve forward, a choice of gradient backward.

``DEQ(func)(x, z0)`` returns ``z* = func(z*, x)`` found by a solver under a forward budget, and attaches a
gradient to it according to the backward mode (one module each in :mod:`fedeq.deq.backward`):

- ``ift``: the exact implicit gradient. With ``w = ∂L/∂z*`` the adjoint solves ``g = J_fᵀ g + w`` (fixed
  point, same solver family, backward budget); then ``∂L/∂θ = (∂f/∂θ)ᵀ g``.
- ``phantom``: ``k`` damped unrolled steps ``z ← (1-λ) z + λ f(z, x)`` from ``z*`` with autograd through
  them (``k`` = backward budget unless ``phantom_steps`` is set).
- ``jfb``: one step ``z = f(z*, x)`` (Jacobian-free backprop), i.e. ``g = w``.
- ``broyden_reuse``: ``g ≈ -Bᵀ w`` with ``B ≈ (J_f - I)^{-1}`` the forward Broyden estimate at the
  returned iterate (no extra function evaluations); per sample it falls back to ``g = w`` (JFB) when
  ``||g|| > c·||w||``; ``reuse_updates`` / ``reuse_refine_iter`` spend a few VJPs to improve it, and
  ``reuse_opa_every`` makes SHINE's outer-problem-aware updates during the forward solve when the call
  passes ``outer_grad`` (the loss gradient at an iterate).

Budgets and options can be overridden per call so devices with different budgets share one module.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from fedeq.deq.backward import BackwardStats, check_backward_solver, check_reuse_options, get_backward
from fedeq.deq.regularizers import jacobian_frobenius
from fedeq.deq.solvers import OuterGradient, Solver, SolverStats, check_solver_args, get_solver, solve

__all__ = [
    "DEQ",
    "BackwardStats",
    "DEQOutput",
    "DEQSettings",
    "SolverStats",
    "equilibrium",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class DEQSettings:
    """Solver, budgets and backward mode of a DEQ call; ``validate`` raises on any bad value."""

    solver: str = "anderson"
    f_max_iter: int = 30
    b_max_iter: int = 30
    tol: float = 1e-4
    b_tol: float | None = None
    stop_mode: str = "rel"
    backward: str = "ift"
    b_solver: str | None = None
    phantom_steps: int | None = None
    phantom_damping: float = 0.8
    reuse_threshold: float = 1.8
    reuse_updates: int = 0
    reuse_direction: str = "adjoint"
    reuse_refine_iter: int = 0
    reuse_opa_every: int = 0
    """``broyden_reuse``: an outer-problem-aware Broyden update every this many forward evaluations (0: off;
    SHINE's frequency is 5); only in calls that pass ``outer_grad`` with gradients enabled."""
    jac_reg_samples: int = 0
    solver_options: dict[str, Any] = field(default_factory=dict)
    b_solver_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> DEQSettings:
        get_solver(self.solver)
        if self.b_solver is not None:
            get_solver(self.b_solver)
        check_solver_args(self.f_max_iter, self.tol, self.stop_mode, prefix="f_")
        check_solver_args(self.b_max_iter, self.backward_tol, self.stop_mode, prefix="b_")
        check_backward_solver(self.backward, self.solver)  # the mode's `requires_solver`
        if self.phantom_steps is not None and (
            not isinstance(self.phantom_steps, int) or self.phantom_steps < 1
        ):
            raise ValueError(f"phantom_steps must be an integer >= 1 or None (got {self.phantom_steps!r})")
        if not 0.0 < self.phantom_damping <= 1.0:
            raise ValueError(f"phantom_damping must be in (0, 1] (got {self.phantom_damping!r})")
        if not self.reuse_threshold > 0:
            raise ValueError(f"reuse_threshold must be > 0 (got {self.reuse_threshold!r})")
        check_reuse_options(
            self.reuse_updates, self.reuse_direction, self.reuse_refine_iter, self.reuse_opa_every
        )
        if not isinstance(self.jac_reg_samples, int) or self.jac_reg_samples < 0:
            raise ValueError(f"jac_reg_samples must be an integer >= 0 (got {self.jac_reg_samples!r})")
        _check_solver_options(self.solver, self.solver_options, "solver_options")
        _check_solver_options(self.backward_solver, self.b_solver_options, "b_solver_options")
        return self

    @property
    def backward_solver(self) -> str:
        """The adjoint's solver: ``b_solver``, else the forward solver's ``default_backward_solver``, else
        the forward solver itself."""
        return self.b_solver or get_solver(self.solver).default_backward_solver or self.solver

    @property
    def backward_tol(self) -> float:
        return self.tol if self.b_tol is None else self.b_tol

    def override(self, **changes: Any) -> DEQSettings:
        """A validated copy with ``changes``; unknown names raise ``ValueError`` listing the allowed ones."""
        allowed = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"unknown DEQ option(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
        changes = {
            k: v for k, v in changes.items() if v is not None or k in ("b_solver", "b_tol", "phantom_steps")
        }
        return replace(self, **changes).validate() if changes else self


@functools.cache
def _solver_option_names(cls: type[Solver]) -> frozenset[str]:
    return frozenset(inspect.signature(cls).parameters)


def _check_solver_options(solver: str, options: dict[str, Any], what: str) -> None:
    """``ValueError`` naming ``what`` unless solver ``solver`` can be built with ``options``."""
    cls = get_solver(solver)
    params = _solver_option_names(cls)
    unknown = sorted(set(options) - params)
    if unknown:
        raise ValueError(
            f"{what}: unknown option(s) {unknown} for solver {solver!r}; allowed: {sorted(params)}"
        )
    try:
        cls(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from None


@dataclass
class DEQOutput:
    """Result of a DEQ call: the equilibrium ``z`` (with gradient attached in training) and statistics."""

    z: Tensor
    forward: SolverStats
    backward: BackwardStats | None
    settings: DEQSettings
    jac_loss: Tensor | None = None
    graph_evals: int = 0
    """Evaluations of ``f`` recorded by autograd after the solve (1 for ift/jfb, k for phantom)."""


class DEQ(nn.Module):
    """Implicit layer ``z* = func(z*, x)``.

    Args:
        func: ``func(z, x) -> z`` (an ``nn.Module`` is registered as a submodule so its parameters train).
        **settings: fields of :class:`DEQSettings` (solver, f_max_iter, b_max_iter, tol, stop_mode,
            backward, ...). Invalid names or values raise ``ValueError`` naming the field.
    """

    def __init__(self, func: Callable[[Tensor, Any], Tensor], **settings: Any) -> None:
        super().__init__()
        self.func = func
        self.settings = DEQSettings().override(**settings).validate()

    def forward(
        self, x: Any, z0: Tensor, outer_grad: Callable[[Tensor], Tensor] | None = None, **overrides: Any
    ) -> DEQOutput:
        """Solve from ``z0`` and attach the gradient. ``outer_grad(z)`` (optional) returns the loss gradient
        ``∂L/∂z`` per sample at an iterate ``z``; it is used only by ``reuse_opa_every`` (with
        ``broyden_reuse``, gradients enabled), whose forward then makes SHINE's outer-problem-aware
        updates, each costing one VJP (``forward.vjps``) and one call of ``outer_grad``."""
        s = self.settings.override(**overrides) if overrides else self.settings
        return equilibrium(self.func, s, x, z0, outer_grad)


def equilibrium(
    func: Callable[[Tensor, Any], Tensor],
    s: DEQSettings,
    x: Any,
    z0: Tensor,
    outer_grad: Callable[[Tensor], Tensor] | None = None,
) -> DEQOutput:
    """What :meth:`DEQ.forward` computes, for any map ``func(z, x)`` and validated settings ``s``: solve
    ``z* = func(z*, x)`` from ``z0`` and attach the gradient of ``s.backward`` (the cohort trainer calls it
    with a map that evaluates many clients' cells at once)."""

    def f(z: Tensor) -> Tensor:
        return func(z, x)

    outer = None
    if (
        outer_grad is not None
        and s.reuse_opa_every > 0
        and s.backward == "broyden_reuse"
        and torch.is_grad_enabled()
    ):
        outer = OuterGradient(outer_grad, s.reuse_opa_every)
    z_star, fstats = solve(f, z0, s.solver, s.f_max_iter, s.tol, s.stop_mode, outer=outer, **s.solver_options)
    if not torch.is_grad_enabled():
        return DEQOutput(z_star, fstats, None, s)

    mode = get_backward(s.backward)()
    z_in = z_star.detach().requires_grad_(mode.needs_z_grad or s.jac_reg_samples > 0)
    fz = func(z_in, x)
    jac_loss = jacobian_frobenius(fz, z_in, s.jac_reg_samples) if s.jac_reg_samples > 0 else None
    bstats = BackwardStats(mode=s.backward)
    z_out, graph_evals = mode.attach(f, z_in, fz, fstats, s, bstats)
    return DEQOutput(z_out, fstats, bstats, s, jac_loss=jac_loss, graph_evals=graph_evals)
