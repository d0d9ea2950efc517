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
  solves do not synchronise on every step; statistics are kept on the device. On the CPU, where a host
  check costs nothing, the solvers also look at the batch after every evaluation so that steps in which no
  sample stops or misbehaves skip the masked updates.
"""

from __future__ import annotations

import math
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


_INF = float("inf")


class _Tracker:
    """Scores candidates, keeps each sample's best one and decides when samples stop.

    Per evaluation only the residual(s) of the batch (a row of a preallocated trace) and the best candidate
    are updated; evaluation counts, flags and the reported residuals are derived from the trace at the end.
    ``thresh`` holds each active sample's best score and ``-inf`` once it stopped, so one comparison both
    selects improved candidates and ignores frozen samples.

    On the CPU a host check costs nothing, so an evaluation where every sample improves and none stops
    (the usual case) only copies the candidate; on other devices every step runs the general masked
    update and the host looks at the batch every ``check_every`` evaluations only.
    """

    def __init__(self, z0: Tensor, max_iter: int, tol: float, stop_mode: str, keep_trace: bool) -> None:
        b = z0.shape[0]
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.host = z0.device.type == "cpu"
        self.keep_trace = keep_trace
        self.best = z0.clone()
        self.thresh = torch.full((b,), _INF, device=z0.device, dtype=z0.dtype)
        self.abs_tr = z0.new_empty(max_iter, b)
        self.rel_tr = z0.new_empty(max_iter, b) if self.rel else None
        self.k = 0
        self.diverged = torch.zeros(b, dtype=torch.bool, device=z0.device)
        # Host-side knowledge (CPU only): has any sample stopped / diverged so far?
        self.any_stopped = not self.host
        self.any_diverged = not self.host

    def update(self, z: Tensor, fz: Tensor, out: Tensor | None = None) -> Tensor:
        """Score candidate ``fz`` (pre-image ``z``); return the residual vector ``fz - z`` (in ``out``)."""
        k = self.k
        self.k += 1
        gz = fz - z if out is None else torch.sub(fz, z, out=out)
        r = self.last_abs = torch.linalg.vector_norm(gz, dim=1, out=self.abs_tr[k])
        if self.rel:
            s = torch.div(r, torch.linalg.vector_norm(fz, dim=1).add_(_EPS), out=self.rel_tr[k])
        else:
            s = r
        thresh = self.thresh
        if self.host:
            if not self.any_stopped and float((s - thresh).max()) < 0 and float(s.min()) > self.tol:
                # Every sample improved (so is finite) and none stopped. The trace row is never written
                # again, so it can serve as the threshold without a copy.
                self.best.copy_(fz)
                self.thresh = s
                return gz
            if math.isfinite(float(s.sum())):
                # Nothing is non-finite: interpolating with 0/1 weights selects the improved candidates
                # exactly (lerp returns `end` itself at weight 1), cheaper than a broadcast `where`.
                better = s < thresh
                self.best.lerp_(fz, better.to(fz.dtype)[:, None])
                stop = s <= self.tol
                self.thresh = torch.where(better, s, thresh).masked_fill_(stop, -_INF)
                if not self.any_stopped:
                    self.any_stopped = bool(stop.any())
                return gz
        active = thresh > -_INF
        better = s < thresh  # False for NaN, inf and frozen samples (thresh = -inf)
        torch.where(better[:, None], fz, self.best, out=self.best)
        thresh = self.thresh = torch.where(better, s, thresh)
        stop = torch.nan_to_num(s, nan=0.0, posinf=0.0) <= self.tol  # converged or non-finite
        thresh.masked_fill_(stop, -_INF)
        div = stop & active & ~torch.isfinite(r)
        self.diverged |= div
        if self.host:
            self.any_stopped = self.any_stopped or bool(stop.any())
            self.any_diverged = self.any_diverged or bool(div.any())
        return gz

    @property
    def all_active(self) -> bool:
        """True only when the host knows that no sample has stopped (CPU)."""
        return not self.any_stopped

    def active_mask(self) -> Tensor:
        return self.thresh > -_INF

    def keep_finite(self, z_new: Tensor) -> Tensor:
        """Replace the iterates of diverged samples by their best finite candidate so non-finite values do
        not spread through batched linear algebra."""
        if not self.any_diverged:
            return z_new
        return torch.where(self.diverged[:, None], self.best, z_new)

    def done(self) -> bool:
        if not self.any_stopped:
            return False
        return not bool((self.thresh > -_INF).any())

    def stats(self, shape: torch.Size, **kwargs) -> tuple[Tensor, SolverStats]:
        k = self.k
        abs_tr = self.abs_tr[:k]
        score_tr = self.rel_tr[:k] if self.rel else abs_tr
        finite = torch.isfinite(abs_tr)
        stop = torch.nan_to_num(score_tr, nan=0.0, posinf=0.0) <= self.tol  # (k, B)
        stopped = stop.any(dim=0)
        first = stop.to(torch.uint8).argmax(dim=0)  # first stopping evaluation (0 when none)
        nfe = torch.where(stopped, first + 1, torch.full_like(first, k))
        finite_at_stop = finite.gather(0, first[None])[0]
        steps = torch.arange(k, device=abs_tr.device)[:, None]
        # The returned candidate is the first lowest finite score among the evaluations while active.
        masked = torch.where((steps < nfe) & finite, score_tr, _INF)
        idx = masked.argmin(dim=0, keepdim=True)
        found = torch.isfinite(masked.gather(0, idx)[0])
        # Samples whose every evaluation was non-finite keep z0 and report an infinite residual.
        best_abs = torch.where(found, abs_tr.gather(0, idx)[0], _INF)
        if self.rel:
            best_rel = torch.where(found, score_tr.gather(0, idx)[0], _INF)
        else:
            best_rel = best_abs / (torch.linalg.vector_norm(self.best, dim=1) + _EPS)
        trace = None
        if self.keep_trace:
            trace = list(torch.where(finite, score_tr, float("nan")).unbind(0))
        stats = SolverStats(
            nfe=nfe,
            abs_residual=best_abs,
            rel_residual=best_rel,
            converged=stopped & finite_at_stop,
            diverged=stopped & ~finite_at_stop,
            trace=trace,
            **kwargs,
        )
        return self.best.reshape(shape), stats


def _flat(f: Func, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    def g(z: Tensor) -> Tensor:
        return f(z.reshape(shape)).reshape(shape[0], -1)

    return g


def _finite_rows(x: Tensor, host: bool) -> Tensor | None:
    """``None`` when every row of ``x`` is finite (checked with one reduction on the CPU), else the mask of
    rows whose sum is finite (a row whose sum overflows counts as non-finite)."""
    if host and math.isfinite(x.sum()):
        return None
    return torch.isfinite(x.sum(dim=1, keepdim=True))


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
    tr = _Tracker(z, max_iter, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(z)
    for k in range(max_iter):
        fz = g(z)
        tr.update(z, fz)
        if k == max_iter - 1 or ((k + 1) % every == 0 and tr.done()):
            break
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
        z = tr.keep_finite(z)
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
    mem = min(m, max_iter)
    # History buffers are left uninitialised: only the first n slots, all written, are ever read.
    F = x.new_empty(b, mem, d)
    G = x.new_empty(b, mem, d)  # residuals scaled to unit norm: G S with S = diag(1 / ||g_i||)
    S = x.new_empty(b, mem, 1)
    X = x.new_empty(b, mem, d) if beta != 1.0 else None  # past iterates are only needed when damping
    H = x.new_empty(b, mem, mem)  # S GGᵀ S + (lam + eps) I, one row/column refreshed per step
    tr = _Tracker(x, max_iter, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(x)
    for k in range(max_iter):
        fx = g(x)
        slot = k % mem
        gx = tr.update(x, fx, out=G[:, slot])
        if k == max_iter - 1 or ((k + 1) % every == 0 and tr.done()):
            break
        n = min(k + 1, mem)
        F[:, slot] = fx
        if X is not None:
            X[:, slot] = x
        # Jacobi scaling by 1/||g|| (as diag(GGᵀ)^{-1/2}, floored like it): the scaled system
        # (S GGᵀ S + lam I) y' = S 1, y = S y' is the one in the docstring, better conditioned.
        sc = torch.clamp_min(tr.last_abs, _EPS**0.5, out=S[:, slot, 0]).reciprocal_()
        gx.mul_(sc[:, None])
        row = torch.bmm(gx[:, None], G[:, :n].mT)[:, 0]
        row.select(1, slot).add_(lam + _EPS)
        H[:, slot, :n] = row
        H[:, :n, slot] = row
        if n == 1:
            x_new = fx if beta == 1.0 else torch.lerp(x, fx, beta)
        else:
            A = H if n == mem else H[:, :n, :n]
            if not tr.all_active:
                A = torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0)
            Sn = S if n == mem else S[:, :n]
            y = torch.linalg.solve_ex(A, Sn)[0].mul_(Sn)
            alpha = y.div_(y.sum(dim=1, keepdim=True)).mT  # (b, 1, n)
            x_new = torch.bmm(alpha, F if n == mem else F[:, :n])[:, 0]
            if X is not None:
                x_new = torch.lerp(torch.bmm(alpha, X[:, :n])[:, 0], x_new, beta)
            ok = _finite_rows(x_new, tr.host)
            if ok is not None:
                x_new = torch.where(ok, x_new, fx)
        x = tr.keep_finite(x_new)
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

    Each step applies ``B`` and ``Bᵀ`` once: ``BΔg = B g_new - B g_old`` reuses the previous step's product,
    and the next step ``-B_new g_new`` is that product plus the new rank-one term. When the memory is full
    the oldest term is overwritten (the terms form a sum, so their order does not matter).
    """
    check_solver_args(max_iter, tol, stop_mode)
    mem = max_iter if m is None else m
    if mem < 1:
        raise ValueError(f"m must be an integer >= 1 (got {m!r})")
    shape = z0.shape
    g = _flat(f, shape)
    z = z0.reshape(shape[0], -1)
    b, d = z.shape
    cap = min(mem, max(max_iter - 1, 1))  # at most max_iter - 1 updates happen
    U = z.new_empty(b, cap, d)  # uninitialised: only the n stored terms are read
    V = z.new_empty(b, cap, d)
    tr = _Tracker(z, max_iter, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(z)
    n = 0  # stored rank-one terms
    slot = 0  # where the next term goes
    # The last step Δz is kept as `step` with Δz = sign * step: a plain step Δz = -B g_old is stored as
    # step = B g_old, sign = -1 (no negated copy); a corrected one as step = z_new - z, sign = 1.
    Bg_old = step = None
    sign = 1.0
    for k in range(max_iter):
        fz = g(z)
        gz = tr.update(z, fz)
        if not tr.all_active:
            gz = torch.nan_to_num(gz)
        last = k == max_iter - 1 or ((k + 1) % every == 0 and tr.done())
        if n == 0:
            Bg = -gz
            vT = None if step is None else step * -sign
        else:
            # B g = -g + U (Vᵀ g) and Bᵀ Δz = sign (-s + V (Uᵀ s)); the vector goes on the left of each
            # batched product, which is much faster than the other orientation on the CPU.
            Un, Vn = U[:, :n], V[:, :n]
            c = torch.bmm(gz[:, None], Vn.mT)
            Bg = torch.baddbmm(gz[:, None], c, Un, beta=-1)[:, 0]
            cs = torch.bmm(step[:, None], Un.mT)
            vT = torch.baddbmm(step[:, None], cs, Vn, beta=-sign, alpha=sign)[:, 0]
        if vT is not None:
            vg = torch.linalg.vecdot(step, Bg)[:, None]  # vᵀ g / sign, as vᵀ = Δzᵀ B
            u = None
            if sign < 0 and tr.host:
                # Plain step: Δzᵀ BΔg = Δzᵀ(B g - B g_old) = vᵀg + ||Δz||² and Δz - BΔg = -B g.
                denom = torch.linalg.vecdot(step, step)[:, None].sub_(vg)
                if float(denom.abs().min()) > _EPS:
                    u = Bg * denom.reciprocal_().neg_()
                    v = vT
                    vg = vg.neg_()
            if u is None:
                dz = step * sign
                Bdg = Bg - Bg_old
                denom = torch.linalg.vecdot(dz, Bdg)[:, None]
                good = denom.abs() > _EPS
                u = torch.where(good, (dz - Bdg) / torch.where(good, denom, 1.0), 0.0)
                v = torch.where(good, vT, 0.0)
                vg = torch.where(good, vg * sign, 0.0)
            if n == cap and not last:  # the oldest term is overwritten: drop it from B g as well
                Bg = Bg.addcmul_(U[:, slot], c[:, :, slot], value=-1)
            U[:, slot] = u
            V[:, slot] = v
            slot = (slot + 1) % cap
            n = min(n + 1, cap)
            if not last:  # B_new g = B_old g + u (vᵀ g)
                Bg = Bg.addcmul_(u, vg)
        if last:
            break
        z_new = z - Bg
        ok = _finite_rows(z_new, tr.host)
        if ok is not None:
            z_new = torch.where(ok, z_new, fz)
        if not tr.all_active:
            # Frozen samples stop moving so their Broyden factors describe their returned point.
            z_new = torch.where(tr.active_mask()[:, None], z_new, z)
        if ok is None and tr.all_active:
            step, sign = Bg, -1.0
        else:
            step, sign = z_new - z, 1.0
        z = tr.keep_finite(z_new)
        Bg_old = Bg
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
