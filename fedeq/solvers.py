"""Batched fixed-point solvers with exact evaluation budgets.

Every solver has the same calling convention::

    z, stats = solver(f, z0, max_iter=..., tol=..., stop_mode="abs" | "rel", **options)

``f`` maps a tensor of shape ``(B, ...)`` to a tensor of the same shape, independently per sample.
The solver looks for ``z* = f(z*)``. One *function evaluation* (NFE) is one call of ``f`` on the batch.

Conventions shared by all solvers:

- ``max_iter`` is the exact number of calls of ``f``; it is never exceeded.
- At evaluation ``k`` the solver evaluates ``f(z_k)`` and scores the candidate ``f(z_k)`` with the residual
  ``r_k = ||f(z_k) - z_k||`` (``rel``: divided by ``||f(z_k)||``). The returned iterate of each sample is its
  lowest-residual candidate, so ``max_iter = 1`` already returns ``f(z0)``, never the initial guess.
- A sample stops (its statistics freeze) once its residual is below ``tol`` or once an evaluation gives a
  non-finite value; the latter marks it *diverged* and keeps its best finite candidate (or ``z0``).
- Convergence of the whole batch is checked on the host every ``check_every`` evaluations only, so GPU
  solves do not synchronise on every step; statistics are kept on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
Func = Callable[[Tensor], Tensor]

STOP_MODES = ("abs", "rel")
_EPS = 1e-12


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
    broyden_factors: tuple[Tensor, Tensor] | None = None
    """Broyden only: ``(U, V)`` of shape (B, m, d) with ``J_g^{-1} ≈ -I + Σ_i u_i v_iᵀ`` (g(z) = f(z) - z)."""
    extra: dict = field(default_factory=dict)

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


def _default_check_every(z: Tensor) -> int:
    return 1 if z.device.type == "cpu" else 4


class _Tracker:
    """Keeps each sample's best candidate, its statistics and the active mask."""

    def __init__(self, z0: Tensor, tol: float, stop_mode: str, keep_trace: bool) -> None:
        b = z0.shape[0]
        dev = z0.device
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.best = z0.clone()
        self.best_abs = torch.full((b,), float("inf"), device=dev, dtype=z0.dtype)
        self.best_rel = torch.full((b,), float("inf"), device=dev, dtype=z0.dtype)
        self.nfe = torch.zeros(b, dtype=torch.int64, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.diverged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.trace: list[Tensor] | None = [] if keep_trace else None

    def update(self, z: Tensor, fz: Tensor) -> Tensor:
        """Score candidate ``fz`` (pre-image ``z``); return the residual vector ``fz - z`` (flattened)."""
        gz = fz - z
        abs_r = gz.norm(dim=1)
        rel_r = abs_r / (fz.norm(dim=1) + _EPS)
        finite = torch.isfinite(abs_r) & torch.isfinite(fz).all(dim=1)
        act = self.active
        self.nfe += act.to(torch.int64)
        score = rel_r if self.rel else abs_r
        best_score = self.best_rel if self.rel else self.best_abs
        better = act & finite & (score < best_score)
        self.best = torch.where(better[:, None], fz, self.best)
        self.best_abs = torch.where(better, abs_r, self.best_abs)
        self.best_rel = torch.where(better, rel_r, self.best_rel)
        newly_div = act & ~finite
        newly_conv = act & finite & (score <= self.tol)
        self.diverged |= newly_div
        self.converged |= newly_conv
        self.active = act & ~newly_div & ~newly_conv
        if self.trace is not None:
            self.trace.append(torch.where(finite, score, torch.full_like(score, float("nan"))))
        return gz

    def done(self) -> bool:
        return not bool(self.active.any())

    def stats(self, shape: torch.Size, **kwargs) -> tuple[Tensor, SolverStats]:
        # Samples whose every evaluation was non-finite keep z0 and report an infinite residual.
        stats = SolverStats(
            nfe=self.nfe,
            abs_residual=self.best_abs,
            rel_residual=self.best_rel,
            converged=self.converged,
            diverged=self.diverged,
            trace=self.trace,
            **kwargs,
        )
        return self.best.reshape(shape), stats


def _flat(f: Func, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    def g(z: Tensor) -> Tensor:
        return f(z.reshape(shape)).reshape(shape[0], -1)

    return g


def _keep_finite(z_new: Tensor, tracker: _Tracker) -> Tensor:
    """Replace the iterates of diverged samples by their best finite candidate so non-finite values do not
    spread through batched linear algebra."""
    return torch.where(tracker.diverged[:, None], tracker.best, z_new)


@torch.no_grad()
def fixed_point(
    f: Func,
    z0: Tensor,
    max_iter: int = 30,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    damping: float = 1.0,
    keep_trace: bool = False,
    check_every: int | None = None,
) -> tuple[Tensor, SolverStats]:
    """Damped fixed-point iteration ``z_{k+1} = (1 - β) z_k + β f(z_k)`` with β = ``damping`` ∈ (0, 1]."""
    check_solver_args(max_iter, tol, stop_mode)
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1] (got {damping!r})")
    shape = z0.shape
    g = _flat(f, shape)
    z = z0.reshape(shape[0], -1)
    tr = _Tracker(z, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(z)
    for k in range(max_iter):
        fz = g(z)
        tr.update(z, fz)
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
        z = _keep_finite(z, tr)
        if (k + 1) % every == 0 and tr.done():
            break
    return tr.stats(shape)


@torch.no_grad()
def anderson(
    f: Func,
    z0: Tensor,
    max_iter: int = 30,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    keep_trace: bool = False,
    check_every: int | None = None,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II) with memory ``m``, Tikhonov ``lam`` and mixing ``beta``.

    With ``G = [g_{k-n+1}, …, g_k]`` the last residuals ``g_i = f(x_i) - x_i``, the mixing weights solve
    ``min_α ||Gα||² + lam Σ_i ||g_i||² α_i²`` s.t. ``Σα = 1`` (a per-column relative Tikhonov term), i.e.
    ``α = y / Σy`` with ``(GGᵀ + lam·diag(GGᵀ)) y = 1`` — and
    the next iterate is ``x_{k+1} = β Σ α_i f(x_i) + (1 - β) Σ α_i x_i``. The Gram matrix is updated one
    row per step (O(B·m·d) per evaluation).
    """
    check_solver_args(max_iter, tol, stop_mode)
    if m < 1:
        raise ValueError(f"m must be an integer >= 1 (got {m!r})")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (got {lam!r})")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1] (got {beta!r})")
    shape = z0.shape
    g = _flat(f, shape)
    x = z0.reshape(shape[0], -1)
    b, d = x.shape
    X = x.new_zeros(b, m, d)
    F = x.new_zeros(b, m, d)
    G = x.new_zeros(b, m, d)
    H = x.new_zeros(b, m, m)
    tr = _Tracker(x, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(x)
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    for k in range(max_iter):
        fx = g(x)
        gx = tr.update(x, fx)
        slot = k % m
        X[:, slot] = x
        F[:, slot] = fx
        G[:, slot] = gx
        n = min(k + 1, m)
        # Refresh row/column `slot` of the Gram matrix GGᵀ.
        row = torch.einsum("bd,bnd->bn", gx, G[:, :n])
        H[:, slot, :n] = row
        H[:, :n, slot] = row
        if (k + 1) % every == 0 and tr.done():
            break
        if k == max_iter - 1:
            break
        if n == 1:
            x_new = fx if beta == 1.0 else torch.lerp(x, fx, beta)
        else:
            Hn = H[:, :n, :n]
            # Jacobi scaling S = diag(H)^{-1/2}: solve (S H S + lam I) y' = S 1, y = S y'.
            sc = Hn.diagonal(dim1=1, dim2=2).clamp_min(_EPS).rsqrt()
            A = torch.nan_to_num(sc[:, :, None] * Hn * sc[:, None, :], nan=0.0, posinf=0.0, neginf=0.0)
            A = A + (lam + _EPS) * eye[:n, :n]
            y, _ = torch.linalg.solve_ex(A, sc[:, :, None])
            y = sc[:, :, None] * y
            alpha = y / y.sum(dim=1, keepdim=True)
            x_new = beta * torch.einsum("bn,bnd->bd", alpha[..., 0], F[:, :n])
            if beta != 1.0:
                x_new = x_new + (1 - beta) * torch.einsum("bn,bnd->bd", alpha[..., 0], X[:, :n])
            bad = ~torch.isfinite(x_new).all(dim=1, keepdim=True)
            x_new = torch.where(bad, fx, x_new)
        x = _keep_finite(x_new, tr)
    return tr.stats(shape)


@torch.no_grad()
def broyden(
    f: Func,
    z0: Tensor,
    max_iter: int = 30,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int | None = None,
    keep_trace: bool = False,
    check_every: int | None = None,
) -> tuple[Tensor, SolverStats]:
    """Limited-memory ("good") Broyden on ``g(z) = f(z) - z = 0``.

    The inverse Jacobian estimate is ``B = -I + U Vᵀ`` (rank ≤ ``m``, default ``max_iter``); the step is
    ``Δz = -B g`` and the rank-one update is ``B ← B + (Δz - BΔg) Δzᵀ B / (Δzᵀ B Δg)``. The final factors
    are returned in ``stats.broyden_factors`` for the ``broyden_reuse`` backward.
    """
    check_solver_args(max_iter, tol, stop_mode)
    mem = max_iter if m is None else m
    if mem < 1:
        raise ValueError(f"m must be an integer >= 1 (got {m!r})")
    shape = z0.shape
    g = _flat(f, shape)
    z = z0.reshape(shape[0], -1)
    b, d = z.shape
    U = z.new_zeros(b, mem, d)
    V = z.new_zeros(b, mem, d)
    tr = _Tracker(z, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(z)
    n = 0  # number of stored rank-one terms

    def apply_B(w: Tensor) -> Tensor:  # B w = -w + U (Vᵀ w)
        if n == 0:
            return -w
        return -w + torch.einsum("bn,bnd->bd", torch.einsum("bnd,bd->bn", V[:, :n], w), U[:, :n])

    def apply_Bt(w: Tensor) -> Tensor:  # Bᵀ w = -w + V (Uᵀ w)
        if n == 0:
            return -w
        return -w + torch.einsum("bn,bnd->bd", torch.einsum("bnd,bd->bn", U[:, :n], w), V[:, :n])

    gz = None
    dz = torch.zeros_like(z)
    for k in range(max_iter):
        fz = g(z)
        gz_new = tr.update(z, fz)
        if gz is not None:
            dg = torch.nan_to_num(gz_new - gz)
            Bdg = apply_B(dg)
            vT = apply_Bt(dz)
            denom = (dz * Bdg).sum(dim=1, keepdim=True)
            ok = denom.abs() > _EPS
            u = torch.where(ok, (dz - Bdg) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
            v = torch.where(ok, vT, 0.0)
            if n < mem:
                U[:, n], V[:, n] = u, v
                n += 1
            else:  # forget the oldest term
                U = torch.roll(U, -1, dims=1)
                V = torch.roll(V, -1, dims=1)
                U[:, -1], V[:, -1] = u, v
        gz = gz_new
        if (k + 1) % every == 0 and tr.done():
            break
        if k == max_iter - 1:
            break
        dz = -apply_B(torch.nan_to_num(gz))
        z_new = z + dz
        bad = ~torch.isfinite(z_new).all(dim=1, keepdim=True)
        z_new = torch.where(bad, fz, z_new)
        # Frozen samples stop moving so their Broyden factors describe their returned point.
        z_new = torch.where(tr.active[:, None], z_new, z)
        dz = z_new - z
        z = _keep_finite(z_new, tr)
    return tr.stats(shape, broyden_factors=(U[:, :n], V[:, :n]))


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverStats]]] = {
    "fixed_point": fixed_point,
    "anderson": anderson,
    "broyden": broyden,
}


def get_solver(name: str) -> Callable[..., tuple[Tensor, SolverStats]]:
    """Look up a solver by name; unknown names raise ``ValueError`` listing the allowed ones."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} (got {name!r})") from None


def solve(
    f: Func,
    z0: Tensor,
    solver: str = "anderson",
    max_iter: int = 30,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **options,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = f(z)`` with the named solver (see module docstring for the conventions)."""
    return get_solver(solver)(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options)
