"""The one iteration loop of every solver, its best-iterate tracker, and :func:`solve`.

``f`` maps a tensor of shape ``(B, ...)`` to one of the same shape, independently per sample; the loop
looks for ``z* = f(z*)`` on the flattened ``(B, d)`` iterates. One *function evaluation* (NFE) is one call
of ``f`` on the batch. Conventions shared by all solvers:

- ``max_iter`` is the exact number of calls of ``f``; it is never exceeded.
- At evaluation ``k`` the loop evaluates ``f(z_k)`` and scores the candidate ``f(z_k)`` with the residual
  ``r_k = ||f(z_k) - z_k||`` (``rel``: divided by ``||f(z_k)||``). The returned iterate of each sample is its
  lowest-residual candidate, so ``max_iter = 1`` already returns ``f(z0)``, never the initial guess.
- A sample stops (its statistics freeze) once its residual is below ``tol`` or once an evaluation gives a
  non-finite value; the latter marks it *diverged* and keeps its best finite candidate (or ``z0``), which
  also replaces its next iterates so that non-finite values do not spread through batched linear algebra.
- Convergence of the whole batch is checked on the host every ``check_every`` evaluations only, so GPU
  solves do not synchronise on every step; statistics are kept on the device. On the CPU, where a host
  check costs nothing, the tracker also looks at the batch after every evaluation so that steps in which no
  sample stops or misbehaves skip the masked updates.
- Outer-problem-aware updates (``outer``, Broyden only) run some evaluations with a graph in ``z`` and
  take one vector-Jacobian product through each; these are not evaluations of ``f`` and are counted
  apart, in ``stats.vjps``.
- Candidates are kept by reference, not copied: ``f`` must return a tensor that it does not modify later
  (as any out-of-place PyTorch expression does). The returned iterate may be one of ``f``'s outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fedeq.deq.solvers.base import EPS, OuterGradient, Solver, SolverStats, check_solver_args
from fedeq.registry import SOLVERS

Tensor = torch.Tensor
Func = Callable[[Tensor], Tensor]

_INF = float("inf")


def host_checks(z: Tensor) -> bool:
    """Whether the tracker looks at the batch on the host after every evaluation (the CPU, where it is
    free); elsewhere the masked updates run without synchronising."""
    return z.device.type == "cpu"


def default_check_every(z: Tensor) -> int:
    """Evaluations between whole-batch convergence checks: 1 on the CPU, 4 elsewhere."""
    return 1 if z.device.type == "cpu" else 4


def finite_rows(x: Tensor, host: bool) -> Tensor | None:
    """``None`` when every row of ``x`` is finite (checked with one reduction on the host), else the (B, 1)
    mask of rows whose sum is finite (a row whose sum overflows counts as non-finite)."""
    if host and math.isfinite(x.sum()):
        return None
    return torch.isfinite(x.sum(dim=1, keepdim=True))


class Tracker:
    """Scores candidates, keeps each sample's best one and decides when samples stop.

    Per evaluation only the residual(s) of the batch (a row of a preallocated trace) and the best candidate
    are updated; evaluation counts, flags and the reported residuals are derived from the trace at the end.
    ``thresh`` holds each active sample's best score and ``-inf`` once it stopped, so one comparison both
    selects improved candidates and ignores frozen samples. The best candidate is replaced, never updated
    in place, so a step in which every sample improves costs no copy.

    What a solver's step may read: ``host`` (the host checks the batch after every evaluation),
    ``all_active`` (the host knows that no sample stopped), :meth:`active_mask` and ``diverged``.
    """

    def __init__(self, z0: Tensor, max_iter: int, tol: float, stop_mode: str, keep_trace: bool) -> None:
        b = z0.shape[0]
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.host = host_checks(z0)
        self.keep_trace = keep_trace
        self.best = self.z0 = z0
        self.thresh = torch.full((b,), _INF, device=z0.device, dtype=z0.dtype)
        self.abs_tr = z0.new_empty(max_iter, b)
        self.rel_tr = z0.new_empty(max_iter, b) if self.rel else None
        self.k = 0
        self.diverged = torch.zeros(b, dtype=torch.bool, device=z0.device)
        # Host-side knowledge (CPU only): has any sample stopped / diverged so far, and has every
        # evaluation so far improved every sample (then the last candidate is each sample's best)?
        self.any_stopped = not self.host
        self.any_diverged = not self.host
        self.all_improved = self.host

    def abs_row(self) -> Tensor:
        """Where the next residual norm ``||f(z) - z||`` goes."""
        return self.abs_tr[self.k]

    def score(self, fz: Tensor, r: Tensor) -> None:
        """Score candidate ``fz`` whose residual norm is ``r`` (normally written to :meth:`abs_row`)."""
        k = self.k
        if r.data_ptr() != self.abs_tr[k].data_ptr():
            r = self.abs_tr[k].copy_(r)
        self.k += 1
        if self.rel:
            s = torch.div(r, torch.linalg.vector_norm(fz, dim=1).add_(EPS), out=self.rel_tr[k])
        else:
            s = r
        thresh = self.thresh
        if self.host:
            if self.all_improved:
                if float((s - thresh).max()) < 0 and float(s.min()) > self.tol:
                    # Every sample improved (so is finite) and none stopped. The trace row is never
                    # written again, so it can serve as the threshold without a copy.
                    self.best = fz
                    self.thresh = s
                    return
                self.all_improved = False
            if math.isfinite(float(s.sum())):
                # Nothing is non-finite: interpolating with 0/1 weights selects the improved candidates
                # exactly (lerp returns `end` itself at weight 1), cheaper than a broadcast `where`.
                better = s < thresh
                self.best = torch.lerp(self.best, fz, better.to(fz.dtype)[:, None])
                stop = s <= self.tol
                self.thresh = torch.where(better, s, thresh).masked_fill_(stop, -_INF)
                if not self.any_stopped:
                    self.any_stopped = bool(stop.any())
                return
        active = thresh > -_INF
        better = s < thresh  # False for NaN, inf and frozen samples (thresh = -inf)
        self.best = torch.where(better[:, None], fz, self.best)
        thresh = self.thresh = torch.where(better, s, thresh)
        stop = torch.nan_to_num(s, nan=0.0, posinf=0.0) <= self.tol  # converged or non-finite
        thresh.masked_fill_(stop, -_INF)
        div = stop & active & ~torch.isfinite(r)
        self.diverged |= div
        if self.host:
            self.any_stopped = self.any_stopped or bool(stop.any())
            self.any_diverged = self.any_diverged or bool(div.any())

    @property
    def all_active(self) -> bool:
        """True only when the host knows that no sample has stopped (CPU)."""
        return not self.any_stopped

    def active_mask(self) -> Tensor:
        """Samples that have not stopped, shape (B,)."""
        return self.thresh > -_INF

    def keep_finite(self, z_new: Tensor) -> Tensor:
        """``z_new`` with the iterates of diverged samples replaced by their best finite candidate."""
        if not self.any_diverged:
            return z_new
        return torch.where(self.diverged[:, None], self.best, z_new)

    def done(self) -> bool:
        """Whether every sample has stopped (a host synchronisation off the CPU)."""
        if not self.any_stopped:
            return False
        return not bool((self.thresh > -_INF).any())

    def best_index(self) -> Tensor:
        """The evaluation (0-based) whose candidate each sample returns, shape (B,), int64; -1 for a sample
        that returns ``z0`` (every evaluation non-finite). The same choice as :meth:`stats`."""
        k = self.k
        score_tr = self.rel_tr[:k] if self.rel else self.abs_tr[:k]
        if self.host and not self.any_stopped:
            if self.all_improved:
                return torch.full((score_tr.shape[1],), k - 1, dtype=torch.int64, device=score_tr.device)
            return score_tr.argmin(dim=0)
        finite = torch.isfinite(self.abs_tr[:k])
        stop = torch.nan_to_num(score_tr, nan=0.0, posinf=0.0) <= self.tol
        first = stop.to(torch.uint8).argmax(dim=0)
        nfe = torch.where(stop.any(dim=0), first + 1, torch.full_like(first, k))
        steps = torch.arange(k, device=score_tr.device)[:, None]
        masked = torch.where((steps < nfe) & finite, score_tr, _INF)
        idx = masked.argmin(dim=0)
        return torch.where(torch.isfinite(masked.gather(0, idx[None])[0]), idx, -1)

    def stats(self, shape: torch.Size, **extra: Any) -> tuple[Tensor, SolverStats]:
        """The returned iterates (reshaped to ``shape``) and their statistics."""
        k = self.k
        abs_tr = self.abs_tr[:k]
        score_tr = self.rel_tr[:k] if self.rel else abs_tr
        if self.host and not self.any_stopped:
            # CPU, no sample stopped, so every score is finite: the best is the first lowest score, and the
            # last one when every evaluation improved every sample.
            b = abs_tr.shape[1]
            nfe = torch.full((b,), k, dtype=torch.int64, device=abs_tr.device)
            no = torch.zeros(b, dtype=torch.bool, device=abs_tr.device)
            if self.all_improved:
                best_abs = abs_tr[k - 1]
                best_rel = score_tr[k - 1] if self.rel else None
            else:
                idx = score_tr.argmin(dim=0, keepdim=True)
                best_abs = abs_tr.gather(0, idx)[0]
                best_rel = score_tr.gather(0, idx)[0] if self.rel else None
            trace = list(score_tr.unbind(0)) if self.keep_trace else None
            converged, diverged = no, no.clone()
        else:
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
            best_rel = torch.where(found, score_tr.gather(0, idx)[0], _INF) if self.rel else None
            trace = list(torch.where(finite, score_tr, float("nan")).unbind(0)) if self.keep_trace else None
            converged, diverged = stopped & finite_at_stop, stopped & ~finite_at_stop
        if best_rel is None:
            best_rel = best_abs / (torch.linalg.vector_norm(self.best, dim=1) + EPS)
        stats = SolverStats(
            nfe=nfe,
            abs_residual=best_abs,
            rel_residual=best_rel,
            converged=converged,
            diverged=diverged,
            trace=trace,
            **extra,
        )
        best = self.best.clone() if self.best is self.z0 else self.best  # never hand back the caller's z0
        return best.reshape(shape), stats


def _flat(f: Func, shape: torch.Size) -> Func:
    if len(shape) == 2:
        return f

    def g(z: Tensor) -> Tensor:
        return f(z.reshape(shape)).reshape(shape[0], -1)

    return g


@torch.no_grad()
def loop(
    solver: Solver,
    f: Func,
    z0: Tensor,
    max_iter: int,
    tol: float,
    stop_mode: str,
    outer: OuterGradient | None = None,
) -> tuple[Tensor, SolverStats]:
    """Run ``solver`` on ``z = f(z)`` from ``z0`` with exactly at most ``max_iter`` evaluations of ``f``.

    With ``outer``, each evaluation that ``outer.due`` names runs ``f`` with a graph in ``z``, and after
    its step the solver makes an outer-problem-aware update (one VJP through that graph, counted in
    ``stats.vjps``)."""
    check_solver_args(max_iter, tol, stop_mode)
    shape = z0.shape
    g = _flat(f, shape)
    z = z0.reshape(shape[0], -1)
    track = Tracker(z, max_iter, tol, stop_mode, solver.keep_trace)
    every = solver.check_every or default_check_every(z)
    state = solver.init(z, max_iter) if outer is None else solver.init_outer(z, max_iter, outer)
    vjps = 0
    for k in range(max_iter):
        due = outer is not None and outer.due(k, max_iter)
        if due:  # the same evaluation, with a graph in z for the update's VJP
            with torch.enable_grad():
                z_in = z.detach().requires_grad_(True)
                fz_graph = g(z_in)
            fz = fz_graph.detach()
        else:
            fz = g(z)
        track.score(fz, solver.residual(state, k, z, fz, track))
        last = k == max_iter - 1 or ((k + 1) % every == 0 and track.done())
        z_new = solver.step(state, k, z, fz, track, last)
        if last:
            break
        if due:

            def vjp(v: Tensor, out: Tensor = fz_graph, inp: Tensor = z_in) -> Tensor:
                with torch.enable_grad():
                    return torch.autograd.grad(out, inp, v)[0]

            grad = outer.grad(z.reshape(shape)).detach().reshape(z.shape).to(z.dtype)
            solver.outer_update(state, k, z, vjp, grad, track)
            vjps += 1
            del fz_graph, z_in
        z = track.keep_finite(z_new)
    return track.stats(shape, vjps=vjps, **solver.finish(state, track))


def get_solver(name: str) -> type[Solver]:
    """The solver class registered as ``name``; ``ValueError`` listing the allowed names otherwise."""
    try:
        return SOLVERS.get(name)
    except ValueError:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS.names())} (got {name!r})") from None


def solve(
    f: Func,
    z0: Tensor,
    solver: str | Solver = "anderson",
    max_iter: int = 30,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    outer: OuterGradient | None = None,
    **options: Any,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = f(z)`` with the named solver built with ``options`` (or a solver object) under the
    conventions of this module; unknown options raise ``TypeError``. ``outer`` (an
    :class:`~fedeq.deq.solvers.base.OuterGradient`) asks for outer-problem-aware updates (Broyden only)."""
    if isinstance(solver, Solver):
        if options:
            raise TypeError(f"options {sorted(options)} given with a solver object; set them on the object")
        obj = solver
    else:
        obj = get_solver(solver)(**options)
    return loop(obj, f, z0, max_iter, tol, stop_mode, outer)
