"""The solver interface, its statistics and the checks of the arguments every solve shares.

A solver is a frozen dataclass whose fields are its options (``Anderson(m=6)``). It supplies only what is
its own: the state it keeps between evaluations (:meth:`Solver.init`), optionally how it computes the
residual norm ``||f(z) - z||`` (:meth:`Solver.residual`), and the next iterate (:meth:`Solver.step`).
Everything else, the evaluation budget, the best candidate, divergence, per-sample statistics and
convergence checks, is the one loop of :mod:`fedeq.deq.solvers.iterate`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from fedeq.deq.solvers.iterate import Tracker

Tensor = torch.Tensor

STOP_MODES = ("abs", "rel")
EPS = 1e-12
"""Added to ``||f(z)||`` in relative residuals; Broyden skips updates with smaller denominators."""


@dataclass
class SolverStats:
    """Per-sample statistics of one solve (all tensors have leading dimension B)."""

    nfe: Tensor
    """Function evaluations each sample used before it stopped (int64)."""
    abs_residual: Tensor
    """``||f(z) - z||`` of the returned candidate's pre-image."""
    rel_residual: Tensor
    """``abs_residual / ||f(z)||``."""
    converged: Tensor
    """Residual (in the stop mode) reached ``tol``."""
    diverged: Tensor
    """An evaluation produced a non-finite value."""
    trace: list[Tensor] | None = None
    """Optional residual (stop mode) of every evaluation, each of shape (B,)."""
    broyden_factors: Sequence[Tensor] | None = None
    """Broyden only: ``(U, V)`` of shape (B, m, d) with ``J_g^{-1} ≈ -I + Σ_i u_i v_iᵀ`` (g(z) = f(z) - z):
    a tuple, or a :class:`~fedeq.deq.solvers.broyden.BroydenFactors` that forms the pair on first access."""
    extra: dict = field(default_factory=dict)
    vjps: int = 0
    """Vector-Jacobian products of ``f`` the solve itself spent: Broyden's outer-problem-aware updates
    (:class:`OuterGradient`), one each for the whole batch, each after one loss-gradient pass through the
    readout; 0 otherwise."""

    @property
    def residual(self) -> Tensor:
        """Alias for the relative residual."""
        return self.rel_residual

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats (one host synchronisation)."""
        return {
            "nfe": float(self.nfe.float().mean()),
            "abs_residual": float(self.abs_residual.mean()),
            "rel_residual": float(self.rel_residual.mean()),
            "converged": float(self.converged.float().mean()),
            "diverged": float(self.diverged.float().mean()),
        }


def check_solver_args(max_iter: int, tol: float, stop_mode: str, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the argument when a budget, tolerance or stop mode is invalid."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{prefix}max_iter must be an integer >= 1 (got {max_iter!r})")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{prefix}tol must be a number > 0 (got {tol!r})")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"{prefix}stop_mode must be one of {', '.join(STOP_MODES)} (got {stop_mode!r})")


@dataclass(frozen=True)
class OuterGradient:
    """Outer-problem awareness (SHINE's OPA): the solver is handed the gradient of the outer loss.

    ``grad(z)`` returns ``∂L/∂z`` per sample at an iterate ``z`` (shaped like ``z0``, no graph to any
    parameter). A solver that supports it (:class:`~fedeq.deq.solvers.Broyden`) spends one extra
    vector-Jacobian product of ``f`` at evaluation ``k`` when :meth:`due`, to make its inverse-Jacobian
    estimate exact in a direction that the outer gradient chooses.
    """

    grad: Callable[[Tensor], Tensor]
    every: int

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1 (got {self.every!r})")

    def due(self, k: int, max_iter: int) -> bool:
        """Whether evaluation ``k`` (0-based) makes an update: ``k > 1``, ``k`` a multiple of ``every``,
        and a step follows (never at the last evaluation of the budget)."""
        return k > 1 and k % self.every == 0 and k < max_iter - 1

    def count(self, max_iter: int) -> int:
        """The most updates a solve with ``max_iter`` evaluations makes."""
        return sum(self.due(k, max_iter) for k in range(max_iter))


@dataclass(frozen=True, kw_only=True)
class Solver(abc.ABC):
    """A batched fixed-point solver for ``z = f(z)`` on ``(B, d)`` iterates (the loop flattens samples).

    Subclasses are frozen dataclasses (options as fields, checked in ``__post_init__``) registered with
    ``@SOLVERS.register("name")``. The loop calls, per evaluation ``k`` with ``fz = f(z)``:
    ``residual`` (the norm that scores ``fz``), then ``step`` (the next iterate, or nothing on the last
    evaluation), and at the end ``finish`` (extra :class:`SolverStats` fields).

    Attributes:
        keep_trace: record the residual (stop mode) of every evaluation in ``stats.trace``.
        check_every: look at the whole batch for convergence every this many evaluations (default: 1 on
            the CPU, where a host check is free, 4 elsewhere, so GPU solves rarely synchronise).
    """

    keep_trace: bool = False
    check_every: int | None = None

    default_backward_solver: ClassVar[str | None] = None
    """The solver of the DEQ's adjoint fixed point when none is named (``None``: this one)."""

    def __post_init__(self) -> None:
        every = self.check_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"check_every must be an integer >= 1 or None (got {every!r})")

    def init(self, z: Tensor, max_iter: int) -> Any:
        """The state of a solve from ``z`` (B, d) with ``max_iter`` evaluations (buffers, history)."""
        return None

    def residual(self, state: Any, k: int, z: Tensor, fz: Tensor, track: Tracker) -> Tensor:
        """``||f(z) - z||`` per sample, written into ``track.abs_row()`` (and returned)."""
        return torch.linalg.vector_norm(fz - z, dim=1, out=track.abs_row())

    @abc.abstractmethod
    def step(self, state: Any, k: int, z: Tensor, fz: Tensor, track: Tracker, last: bool) -> Tensor | None:
        """The next iterate after evaluation ``k`` (``fz = f(z)``, already scored); ``None`` when ``last``.

        ``track`` tells which samples are still active (``track.active_mask()``) and whether the host knows
        that none stopped (``track.all_active``). The step must not modify ``z`` or ``fz`` in place; the loop
        replaces the next iterates of diverged samples by their best finite candidates.
        """

    def finish(self, state: Any, track: Tracker) -> dict[str, Any]:
        """Extra :class:`SolverStats` fields once the loop ends (and buffers handed back)."""
        return {}

    def init_outer(self, z: Tensor, max_iter: int, outer: OuterGradient) -> Any:
        """The state of a solve that makes outer-problem-aware updates (:class:`OuterGradient`); solvers
        without them raise ``ValueError``."""
        raise ValueError(
            f"solver {type(self).__name__} makes no outer-problem-aware updates (reuse_opa_every needs "
            "solver='broyden')"
        )

    def outer_update(
        self, state: Any, k: int, z: Tensor, vjp: Callable[[Tensor], Tensor], grad: Tensor, track: Tracker
    ) -> None:
        """After the step of evaluation ``k`` (``outer.due(k)``): update the state with the outer gradient
        ``grad`` (B, d) at ``z``, the iterate that evaluation scored; ``vjp(v) = J_fᵀ v`` at ``z``."""
        raise NotImplementedError
