"""The implicit (DEQ) layer: a fixed-point solve forward, a choice of gradient backward.

``DEQ(func)(x, z0)`` returns ``z* = func(z*, x)`` found by a solver under a forward budget, and attaches a
gradient to it according to the backward mode:

- ``ift``: the exact implicit gradient. With ``w = ∂L/∂z*`` the adjoint solves ``g = J_fᵀ g + w`` (fixed
  point, same solver family, backward budget); then ``∂L/∂θ = (∂f/∂θ)ᵀ g``.
- ``phantom``: ``k`` damped unrolled steps ``z ← (1-λ) z + λ f(z, x)`` from ``z*`` with autograd through
  them (``k`` = backward budget unless ``phantom_steps`` is set).
- ``jfb``: one step ``z = f(z*, x)`` (Jacobian-free backprop), i.e. ``g = w``.
- ``broyden_reuse``: ``g ≈ -Bᵀ w`` with ``B ≈ (J_f - I)^{-1}`` the forward Broyden estimate (no extra
  function evaluations); per sample it falls back to ``g = w`` (JFB) when ``||g|| > c·||w||``.

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

from fedeq.deq.regularizers import jacobian_frobenius
from fedeq.deq.solvers.core import (
    SOLVERS,
    SolverStats,
    broyden_transpose_apply,
    check_solver_args,
    get_solver,
    solve,
)

Tensor = torch.Tensor
BACKWARD_MODES = ("ift", "phantom", "jfb", "broyden_reuse")


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
    reuse_threshold: float = 2.0
    jac_reg_samples: int = 0
    solver_options: dict[str, Any] = field(default_factory=dict)
    b_solver_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> DEQSettings:
        get_solver(self.solver)
        if self.b_solver is not None:
            get_solver(self.b_solver)
        check_solver_args(self.f_max_iter, self.tol, self.stop_mode, prefix="f_")
        check_solver_args(self.b_max_iter, self.backward_tol, self.stop_mode, prefix="b_")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {', '.join(BACKWARD_MODES)} (got {self.backward!r})")
        if self.backward == "broyden_reuse" and self.solver != "broyden":
            raise ValueError(
                f"backward 'broyden_reuse' needs solver 'broyden' (got solver {self.solver!r}); "
                "allowed backward modes for other solvers: ift, phantom, jfb"
            )
        if self.phantom_steps is not None and (
            not isinstance(self.phantom_steps, int) or self.phantom_steps < 1
        ):
            raise ValueError(f"phantom_steps must be an integer >= 1 or None (got {self.phantom_steps!r})")
        if not 0.0 < self.phantom_damping <= 1.0:
            raise ValueError(f"phantom_damping must be in (0, 1] (got {self.phantom_damping!r})")
        if not self.reuse_threshold > 0:
            raise ValueError(f"reuse_threshold must be > 0 (got {self.reuse_threshold!r})")
        if not isinstance(self.jac_reg_samples, int) or self.jac_reg_samples < 0:
            raise ValueError(f"jac_reg_samples must be an integer >= 0 (got {self.jac_reg_samples!r})")
        _check_options(self.solver, self.solver_options, "solver_options")
        _check_options(self.backward_solver, self.b_solver_options, "b_solver_options")
        return self

    @property
    def backward_solver(self) -> str:
        return self.b_solver or ("anderson" if self.solver == "broyden" else self.solver)

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


_COMMON_ARGS = {"f", "z0", "max_iter", "tol", "stop_mode"}


@functools.cache
def _solver_option_names(solver: str) -> frozenset[str]:
    return frozenset(inspect.signature(SOLVERS[solver]).parameters) - _COMMON_ARGS


def _check_options(solver: str, options: dict[str, Any], what: str) -> None:
    params = _solver_option_names(solver)
    unknown = sorted(set(options) - params)
    if unknown:
        raise ValueError(
            f"{what}: unknown option(s) {unknown} for solver {solver!r}; allowed: {sorted(params)}"
        )


@dataclass
class BackwardStats:
    """Filled in when the gradient is computed (``ready`` turns True)."""

    mode: str
    ready: bool = False
    nfe: int = 0
    """Vector-Jacobian products used by the backward."""
    abs_residual: Tensor | None = None
    rel_residual: Tensor | None = None
    fallback: Tensor | None = None
    """``broyden_reuse``: samples that fell back to the JFB gradient."""

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"nfe": float(self.nfe)}
        if self.rel_residual is not None:
            out["rel_residual"] = float(self.rel_residual.mean())
        if self.fallback is not None:
            out["fallback"] = float(self.fallback.float().mean())
        return out


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

    def forward(self, x: Any, z0: Tensor, **overrides: Any) -> DEQOutput:
        s = self.settings.override(**overrides) if overrides else self.settings
        func = self.func

        def f(z: Tensor) -> Tensor:
            return func(z, x)

        with torch.no_grad():
            z_star, fstats = solve(f, z0, s.solver, s.f_max_iter, s.tol, s.stop_mode, **s.solver_options)
        if not torch.is_grad_enabled():
            return DEQOutput(z_star, fstats, None, s)

        need_z_grad = s.backward in ("ift", "broyden_reuse") or s.jac_reg_samples > 0
        z_in = z_star.detach().requires_grad_(need_z_grad)
        fz = func(z_in, x)
        jac_loss = jacobian_frobenius(fz, z_in, s.jac_reg_samples) if s.jac_reg_samples > 0 else None
        bstats = BackwardStats(mode=s.backward)
        graph_evals = 1
        if s.backward == "jfb":
            z_out = fz
        elif s.backward == "phantom":
            z_out, steps = phantom_unroll(lambda z: func(z, x), z_in, fz, s)
            graph_evals = steps
            bstats.nfe = steps
            bstats.ready = True
        else:
            z_out = fz
            if fz.requires_grad:
                if s.backward == "ift":
                    hook = _ift_hook(fz, z_in, s, bstats)
                else:
                    hook = _broyden_reuse_hook(fstats, s, bstats)
                fz.register_hook(hook)
        return DEQOutput(z_out, fstats, bstats, s, jac_loss=jac_loss, graph_evals=graph_evals)


def _ift_hook(fz: Tensor, z_in: Tensor, s: DEQSettings, bstats: BackwardStats) -> Callable[[Tensor], Tensor]:
    busy = [False]

    def hook(w: Tensor) -> Tensor:
        if busy[0]:  # vector-Jacobian products below start at fz: leave their gradient alone
            return w
        busy[0] = True
        try:

            def adjoint(g: Tensor) -> Tensor:
                return torch.autograd.grad(fz, z_in, g, retain_graph=True)[0] + w

            return solve_backward(adjoint, w, s, bstats)
        finally:
            busy[0] = False

    return hook


def phantom_unroll(
    step: Callable[[Tensor], Tensor], z_in: Tensor, fz: Tensor, s: DEQSettings
) -> tuple[Tensor, int]:
    """The ``phantom`` gradient path: ``k`` damped steps ``z ← (1-λ) z + λ step(z)`` from ``z_in`` whose first
    evaluation ``fz = step(z_in)`` is given; returns ``(z_k, k)``."""
    steps = s.phantom_steps or s.b_max_iter
    z_out = torch.lerp(z_in, fz, s.phantom_damping)
    for _ in range(steps - 1):
        z_out = torch.lerp(z_out, step(z_out), s.phantom_damping)
    return z_out, steps


def solve_backward(
    adjoint: Callable[[Tensor], Tensor], w: Tensor, s: DEQSettings, bstats: BackwardStats
) -> Tensor:
    """Solve the adjoint fixed point ``g = adjoint(g)`` from ``w`` with the backward solver and budget of
    ``s``; its statistics go to ``bstats`` (which turns ``ready``)."""
    g, st = solve(
        adjoint, w, s.backward_solver, s.b_max_iter, s.backward_tol, s.stop_mode, **s.b_solver_options
    )
    bstats.nfe = int(st.nfe.max())
    bstats.abs_residual, bstats.rel_residual = st.abs_residual, st.rel_residual
    bstats.ready = True
    return g


def _broyden_reuse_hook(
    fstats: SolverStats, s: DEQSettings, bstats: BackwardStats
) -> Callable[[Tensor], Tensor]:
    def hook(w: Tensor) -> Tensor:
        wf = w.reshape(w.shape[0], -1)
        g = broyden_transpose_apply(fstats.broyden_factors, wf)  # type: ignore[arg-type]  # -Bᵀ w
        fallback = ~(g.norm(dim=1) <= s.reuse_threshold * wf.norm(dim=1))
        g = torch.where(fallback[:, None], wf, g)
        bstats.fallback = fallback
        bstats.ready = True
        return g.reshape_as(w)

    return hook
