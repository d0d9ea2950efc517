"""``broyden_reuse``: the adjoint from the forward Broyden estimate, optionally improved with a few VJPs.

With ``g(z) = f(z) - z`` and ``B ≈ J_g^{-1}`` the forward estimate at the returned iterate, the exact adjoint
``(I - J_f)^{-T} w = -J_g^{-T} w`` is approximated by ``-Bᵀ w`` (no extra evaluation of ``f``). Two options
spend vector-Jacobian products (VJPs) through ``fz`` to improve it:

- ``reuse_updates = k``: ``k`` adjoint-secant rank-one updates of ``B`` at the equilibrium. With a
  direction ``σ``, ``y = J_gᵀ σ`` (one VJP), ``u = Bσ`` and ``v = (σ - Bᵀ y) / (yᵀ u)``, the update
  ``B ← B + u vᵀ`` makes ``Bᵀ y = σ`` exact (and does not depend on the scale of ``σ``).
  ``reuse_direction = "adjoint"`` takes ``σ = -Bᵀ w``, the current estimate of the adjoint: then
  ``y ≈ -w`` and each update acts like a quasi-Newton step on the adjoint system ``-J_gᵀ x = w``.
  ``"outer"`` takes ``σ = B w``, the direction of the outer-problem-aware updates of SHINE (Ramzi et
  al., 2022), which that method applies during the forward solve instead.
- ``reuse_refine_iter = n``: the adjoint fixed point ``x = J_fᵀ x + w`` solved from the estimate with the
  backward solver, at most ``n`` VJPs.

Per sample the estimate falls back to ``w`` (JFB) when ``||x|| > c·||w||`` (``c = reuse_threshold``),
before the refinement.

``reuse_opa_every = k`` acts in the forward instead: SHINE's outer-problem-aware (OPA) updates, made by the
Broyden solve every ``k`` evaluations with the loss gradient at the current iterate (see
:class:`~fedeq.deq.solvers.Broyden`); the DEQ call must receive that gradient (``outer_grad``, which a
:class:`~fedeq.models.DEQClassifier` builds from ``targets``). The factors this backward reads then
include those terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from fedeq.deq.backward.base import BackwardStats, HookBackward
from fedeq.deq.solvers import broyden_apply, broyden_transpose_apply, solve
from fedeq.registry import BACKWARDS

if TYPE_CHECKING:
    from fedeq.deq.layer import DEQSettings
    from fedeq.deq.solvers import SolverStats

Tensor = torch.Tensor

_TINY = 1e-12  # an update whose |yᵀu| is below this times ||σ||² is skipped for that sample

REUSE_DIRECTIONS = ("adjoint", "outer")
"""Directions ``σ`` of the ``reuse_updates``: ``-Bᵀ w`` (``adjoint``) or ``B w`` (``outer``)."""


def check_reuse_options(updates: int, direction: str, refine_iter: int, opa_every: int = 0) -> None:
    """``ValueError`` naming the option unless ``reuse_updates``, ``reuse_refine_iter`` and
    ``reuse_opa_every`` are integers >= 0 and ``reuse_direction`` is one of :data:`REUSE_DIRECTIONS`."""
    for name, value in (
        ("reuse_updates", updates),
        ("reuse_refine_iter", refine_iter),
        ("reuse_opa_every", opa_every),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (got {value!r})")
    if direction not in REUSE_DIRECTIONS:
        raise ValueError(f"reuse_direction must be one of {', '.join(REUSE_DIRECTIONS)} (got {direction!r})")


@BACKWARDS.register("broyden_reuse")
class BroydenReuse(HookBackward):
    """``x ≈ -Bᵀ w`` with ``B`` the forward Broyden estimate of ``J_g^{-1}`` (``stats.broyden_factors``),
    improved by ``reuse_updates`` adjoint-secant updates and ``reuse_refine_iter`` adjoint iterations;
    per sample it falls back to ``x = w`` (JFB) when ``||x|| > c·||w||`` (``c`` = ``reuse_threshold``)."""

    requires_solver = "broyden"

    def hook(
        self, z_in: Tensor, fz: Tensor, forward: SolverStats, settings: DEQSettings, stats: BackwardStats
    ) -> Callable[[Tensor], Tensor]:
        busy = [False]

        def vjp(v: Tensor) -> Tensor:
            """``J_fᵀ v`` through the graph of ``fz`` (the hook below leaves this gradient alone)."""
            return torch.autograd.grad(fz, z_in, v, retain_graph=True)[0]

        def hook(w: Tensor) -> Tensor:
            if busy[0]:
                return w
            busy[0] = True
            try:
                return reuse_adjoint(vjp, w, forward.broyden_factors, settings, stats)  # type: ignore[arg-type]
            finally:
                busy[0] = False

        return hook


def reuse_adjoint(
    vjp: Callable[[Tensor], Tensor],
    w: Tensor,
    factors: Sequence[Tensor],
    settings: DEQSettings,
    stats: BackwardStats,
) -> Tensor:
    """The adjoint estimate for ``w = ∂L/∂z*`` from Broyden ``factors``, with the options of ``settings``
    (``vjp(v) = J_fᵀ v``); fills in ``stats``."""
    wf = w.reshape(w.shape[0], -1)
    x = broyden_transpose_apply(factors, wf)  # -Bᵀ w
    if settings.reuse_updates > 0:
        outer = settings.reuse_direction == "outer"
        x = _secant_updates(vjp, wf, x, factors, settings.reuse_updates, outer, w.shape)
    fallback = ~(x.norm(dim=1) <= settings.reuse_threshold * wf.norm(dim=1))
    x = torch.where(fallback[:, None], wf, x)
    stats.fallback = fallback
    stats.nfe = settings.reuse_updates
    out = x.reshape_as(w)
    if settings.reuse_refine_iter > 0:
        s = settings

        def adjoint(g: Tensor) -> Tensor:
            return vjp(g) + w

        budget, tol = s.reuse_refine_iter, s.backward_tol
        out, st = solve(adjoint, out, s.backward_solver, budget, tol, s.stop_mode, **s.b_solver_options)
        stats.nfe += int(st.nfe.max())
        stats.sample_nfe = st.nfe
        stats.abs_residual, stats.rel_residual = st.abs_residual, st.rel_residual
    stats.ready = True
    return out


def _secant_updates(
    vjp: Callable[[Tensor], Tensor],
    w: Tensor,
    x: Tensor,
    factors: Sequence[Tensor],
    k: int,
    outer: bool,
    shape: torch.Size,
) -> Tensor:
    """``k`` adjoint-secant updates ``B ← B + u vᵀ`` along ``σ = x = -Bᵀ w`` (``outer``: ``σ = B w``);
    returns the new ``-Bᵀ w`` (``x`` is the current one).

    The added terms are kept apart from the forward factors: ``B = B₀ + Σ uᵢ vᵢᵀ``."""
    us: list[Tensor] = []
    vs: list[Tensor] = []

    def b_apply(a: Tensor) -> Tensor:  # B a
        out = -broyden_apply(factors, a)
        for u, v in zip(us, vs, strict=True):
            out = out + u * (v * a).sum(1, keepdim=True)
        return out

    def bt_apply(a: Tensor) -> Tensor:  # Bᵀ a
        out = -broyden_transpose_apply(factors, a)
        for u, v in zip(us, vs, strict=True):
            out = out + v * (u * a).sum(1, keepdim=True)
        return out

    for _ in range(k):
        sigma = b_apply(w) if outer else x
        y = vjp(sigma.reshape(shape)).reshape_as(sigma) - sigma  # J_gᵀ σ
        u = b_apply(sigma)
        denom = (y * u).sum(1, keepdim=True)
        good = denom.abs() > _TINY * (sigma * sigma).sum(1, keepdim=True)
        v = torch.where(good, (sigma - bt_apply(y)) / torch.where(good, denom, 1.0), 0.0)
        u = torch.where(good, u, 0.0)
        us.append(u)
        vs.append(v)
        x = x - v * (u * w).sum(1, keepdim=True)  # -B_newᵀ w = -Bᵀ w - v (uᵀ w)
    return x
