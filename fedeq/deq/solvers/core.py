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
- Candidates are kept by reference, not copied: ``f`` must return a tensor that it does not modify later
  (as any out-of-place PyTorch expression does). The returned iterate may be one of ``f``'s outputs.

On the CPU each evaluation's bookkeeping (residual, scores, best candidate, Gram row, the small solve or
Broyden update, the next iterate) runs as one fused call of the C extension ``fedeq._fused`` for float32
and float64 tensors, sample by sample, with the semantics of the PyTorch code below; that code is the
fallback where the extension is not built, on other devices, and with ``FEDEQ_FUSED=0`` (or
:func:`set_fused`). Both give the same results up to floating-point round-off.

On the CPU the solvers keep their history buffers between calls (at most 64 MiB of idle ones per
process), since a fresh multi-megabyte buffer per solve costs more in page faults than the solver's
arithmetic; a Broyden solve's buffers stay reserved while its returned factors are alive.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedeq.deq.solvers._graphs import GraphCache, cuda_graphs_enabled

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
    broyden_factors: Sequence[Tensor] | None = None
    """Broyden only: ``(U, V)`` of shape (B, m, d) with ``J_g^{-1} ≈ -I + Σ_i u_i v_iᵀ`` (g(z) = f(z) - z):
    a tuple, or a :class:`BroydenFactors` that forms the pair on first access."""
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


def _host_checks(z: Tensor) -> bool:
    """Whether the solvers look at the batch on the host after every evaluation (the CPU, where it is
    free); elsewhere they run the masked updates without synchronising."""
    return z.device.type == "cpu"


def _default_check_every(z: Tensor) -> int:
    return 1 if z.device.type == "cpu" else 4


_INF = float("inf")

try:
    from fedeq import _fused
except ImportError:  # the extension was not built: the PyTorch code runs everywhere
    _fused = None

# Flags of a fused step and the largest Anderson memory / Broyden budget it takes (see fedeq/_fused.c).
_FUSED_CONSTANTS = ("ALL_IMPROVED", "ANY_STOPPED", "ANY_DIVERGED", "ALL_DONE", "MAX_MEM", "MAX_K")
_ALL_IMPROVED, _ANY_STOPPED, _ANY_DIVERGED, _ALL_DONE, _FUSED_MAX_MEM, _FUSED_MAX_K = (
    [getattr(_fused, c) for c in _FUSED_CONSTANTS] if _fused is not None else [0] * len(_FUSED_CONSTANTS)
)
_FUSED_DTYPES = {torch.float32: 0, torch.float64: 1}
_fused_on = _fused is not None and os.environ.get("FEDEQ_FUSED", "1") != "0"


def fused_available() -> bool:
    """Whether the fused CPU steps (the ``fedeq._fused`` extension) are built."""
    return _fused is not None


def set_fused(enabled: bool) -> bool:
    """Use the fused CPU steps when available (``True``, the default unless ``FEDEQ_FUSED=0``) or always the
    PyTorch code (``False``); returns the previous setting."""
    global _fused_on
    previous = _fused_on
    _fused_on = bool(enabled) and _fused is not None
    return previous


def _fused_solve(z: Tensor) -> bool:
    """Whether a solve on ``z`` (flattened to (B, d)) takes the fused steps."""
    return _fused_on and z.device.type == "cpu" and z.dtype in _FUSED_DTYPES and z.is_contiguous()


def _fused_pair(fz: Tensor, z: Tensor) -> bool:
    """Whether this evaluation can take the fused step: ``f`` kept dtype, device, shape; both contiguous."""
    return (
        fz.dtype == z.dtype
        and fz.device == z.device
        and fz.shape == z.shape
        and fz.is_contiguous()
        and z.is_contiguous()
    )


class _Workspace:
    """Solver buffers (Anderson's history, Broyden's residual basis, ...) kept between calls on the CPU.

    A buffer of several megabytes allocated afresh on every solve costs a page fault per 4 KiB page on its
    first touch, because the C allocator hands large freed blocks back to the operating system; at the
    sizes of a DEQ layer that is as much time as the solver's own arithmetic. A solver takes a state
    object (buffers and the views it uses) by key and gives it back when done; each state is owned by
    one solve at a time, and a lock guards the pool, so concurrent and nested solves get distinct ones.
    A state that a returned object still refers to (Broyden's factors) is *lent*: it is reused only once
    that object is gone. At most ``max_bytes`` of idle states are kept, least recently used dropped first.
    """

    def __init__(self, max_bytes: int, max_lent: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_lent = max_lent
        self._lock = threading.Lock()
        self._idle: list[tuple[Hashable, Any, int]] = []
        self._lent: list[tuple[Hashable, Any, int, weakref.ref]] = []

    def take(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """An idle state stored under ``key``, else ``make()``."""
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i][0] == key:
                    return self._idle.pop(i)[1]
            for i, (k, obj, _, user) in enumerate(self._lent):
                if k == key and user() is None:
                    del self._lent[i]
                    return obj
        with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode later
            return make()

    def give(self, key: Hashable, obj: Any, nbytes: int, user: Any = None) -> None:
        """Store ``obj`` for reuse; with ``user`` it is lent until ``user`` is garbage collected."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if user is not None:
                self._lent.append((key, obj, nbytes, weakref.ref(user)))
                del self._lent[: -self.max_lent]
                return
            self._idle.append((key, obj, nbytes))
            total = 0
            for i in range(len(self._idle) - 1, -1, -1):
                total += self._idle[i][2]
                if total > self.max_bytes:
                    del self._idle[: i + 1]
                    break


_WORKSPACE = _Workspace(max_bytes=64 * 2**20)
_MIN_WIDTH = 20  # coefficient products at least this wide take PyTorch's BLAS path (see _BroydenViews)


def _cached(x: Tensor) -> bool:
    """Whether solver states for ``x``'s device are kept in :data:`_WORKSPACE` (the CPU only: other devices
    have caching allocators)."""
    return x.device.type == "cpu"


class _Tracker:
    """Scores candidates, keeps each sample's best one and decides when samples stop.

    Per evaluation only the residual(s) of the batch (a row of a preallocated trace) and the best candidate
    are updated; evaluation counts, flags and the reported residuals are derived from the trace at the end.
    ``thresh`` holds each active sample's best score and ``-inf`` once it stopped, so one comparison both
    selects improved candidates and ignores frozen samples.

    Candidates are kept by reference: ``f``'s outputs are never written to, and the best candidate is
    replaced (never updated in place), so a step in which every sample improves costs no copy.

    On the CPU a host check costs nothing, so an evaluation where every sample improves and none stops
    (the usual case) only takes a reference to the candidate; on other devices every step runs the general
    masked update and the host looks at the batch every ``check_every`` evaluations only.
    """

    def __init__(
        self, z0: Tensor, max_iter: int, tol: float, stop_mode: str, keep_trace: bool, static: bool = False
    ) -> None:
        b = z0.shape[0]
        self.tol = tol
        self.rel = stop_mode == "rel"
        # Static: every solve of one signature reuses this tracker, whose best candidate and threshold are
        # buffers updated in place (fixed addresses, as CUDA graphs need); see :meth:`reset`.
        self.static = static
        self.host = _host_checks(z0) and not static
        self.keep_trace = keep_trace
        self.best = self.z0 = z0.clone() if static else z0
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
        self.fused = _fused_solve(z0) and not static
        if self.fused:
            self._setup_fused(z0)

    def reset(self, z0: Tensor, keep_trace: bool) -> None:
        """Start another solve from ``z0`` on a static tracker's buffers."""
        self.best.copy_(z0)
        self.thresh.fill_(_INF)
        self.diverged.zero_()
        self.k = 0
        self.keep_trace = keep_trace

    def _setup_fused(self, z0: Tensor) -> None:
        """Buffers and addresses for the fused steps: the threshold and the best candidates are written in
        place there (``best`` is then either a candidate held by reference or ``_best_own``)."""
        b, d = z0.shape
        self._thresh_own = self.thresh
        self._best_own = torch.empty_like(z0)
        self._better = torch.empty(b, dtype=torch.uint8)
        row = b * z0.element_size()
        self._ptrs = (
            _FUSED_DTYPES[z0.dtype],
            b,
            d,
            self.abs_tr.data_ptr(),
            self.rel_tr.data_ptr() if self.rel else 0,
            self.thresh.data_ptr(),
            self.diverged.data_ptr(),
            self._better.data_ptr(),
            float(self.tol),
            self._best_own.data_ptr(),
            row,
        )

    def fused_args(self) -> tuple:
        """The tracker's leading arguments of a fused step scoring evaluation ``k``."""
        if self.thresh is not self._thresh_own:  # the PyTorch path replaced it: bring it back in place
            self.thresh = self._thresh_own.copy_(self.thresh)
        dt, b, d, abs_p, rel_p, th_p, div_p, bet_p, tol, own_p, row = self._ptrs
        off = self.k * row
        own = self.best is self._best_own
        prev = 0 if own else self.best.data_ptr()
        return (dt, b, d, abs_p + off, rel_p + off if rel_p else 0, th_p, div_p, bet_p, tol, prev, own_p, own)

    def fused_done(self, fz: Tensor, flags: int) -> None:
        """Take the flags of a fused step that scored candidate ``fz``."""
        self.k += 1
        if flags & _ALL_IMPROVED:  # every sample's best is this candidate
            self.best = fz
        else:
            self.all_improved = False
            self.best = self._best_own
        if flags & _ANY_STOPPED:
            self.any_stopped = True
        if flags & _ANY_DIVERGED:
            self.any_diverged = True

    def update(self, z: Tensor, fz: Tensor, out: Tensor | None = None) -> Tensor:
        """Score candidate ``fz`` (pre-image ``z``); return the residual vector ``fz - z`` (in ``out``)."""
        gz = fz - z if out is None else torch.sub(fz, z, out=out)
        self.score(fz, torch.linalg.vector_norm(gz, dim=1, out=self.abs_row()))
        return gz

    def abs_row(self) -> Tensor:
        """Where the next residual norm ``||f(z) - z||`` goes (for callers that compute it themselves)."""
        return self.abs_tr[self.k]

    def score(self, fz: Tensor, r: Tensor) -> None:
        """Score candidate ``fz`` whose residual norm ``r`` was written to :meth:`abs_row`."""
        k = self.k
        self.k += 1
        if self.rel:
            s = torch.div(r, torch.linalg.vector_norm(fz, dim=1).add_(_EPS), out=self.rel_tr[k])
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
        if self.static:
            torch.where(better[:, None], fz, self.best, out=self.best)
            torch.where(better, s, thresh, out=thresh)
        else:
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
            best_rel = best_abs / (torch.linalg.vector_norm(self.best, dim=1) + _EPS)
        stats = SolverStats(
            nfe=nfe,
            abs_residual=best_abs,
            rel_residual=best_rel,
            converged=converged,
            diverged=diverged,
            trace=trace,
            **kwargs,
        )
        # Never hand back the caller's z0, nor a static tracker's buffer that the next solve overwrites.
        best = self.best.clone() if self.static or self.best is self.z0 else self.best
        return best.reshape(shape), stats


def _flat(f: Func, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    if len(shape) == 2:
        return f

    def g(z: Tensor) -> Tensor:
        return f(z.reshape(shape)).reshape(shape[0], -1)

    return g


def _finite_rows(x: Tensor, host: bool) -> Tensor | None:
    """``None`` when every row of ``x`` is finite (checked with one reduction on the CPU), else the mask of
    rows whose sum is finite (a row whose sum overflows counts as non-finite)."""
    if host and math.isfinite(x.sum()):
        return None
    return torch.isfinite(x.sum(dim=1, keepdim=True))


_GRAPHS = GraphCache()


def _graphed(z: Tensor) -> bool:
    """Whether a solve on ``z`` replays its bookkeeping as CUDA graphs (see :mod:`fedeq.deq.solvers._graphs`)."""
    return z.device.type == "cuda" and cuda_graphs_enabled() and not torch.cuda.is_current_stream_capturing()


class _GraphState:
    """The buffers of one solve signature's graphed steps: a static tracker, the staged candidate ``fx``,
    the iterate ``x`` it came from (overwritten by the next one), a residual and the solver's own state."""

    def __init__(self, z: Tensor, max_iter: int, tol: float, stop_mode: str, solver: Any = None) -> None:
        self.tracker = _Tracker(z, max_iter, tol, stop_mode, keep_trace=False, static=True)
        self.x = torch.empty_like(z)
        self.fx = torch.empty_like(z)
        self.res = torch.empty_like(z)
        self.solver = solver


def _graph_solve(
    key: Hashable,
    f: Func,
    z: Tensor,
    shape: torch.Size,
    max_iter: int,
    tol: float,
    stop_mode: str,
    keep_trace: bool,
    every: int,
    make_solver: Callable[[], Any] | None,
    step: Callable[[_GraphState, int, bool], None],
) -> tuple[Tensor, SolverStats] | None:
    """A solve whose bookkeeping ``step(state, k, last)`` (graph-safe, on the state's buffers) is replayed
    as CUDA graphs: per evaluation ``f`` runs eagerly, its output is staged into ``state.fx``, one graph
    launch scores it and writes the next iterate to ``state.x``, which ``f`` gets as a copy (so its inputs
    stay valid). ``None`` when the signature's state serves another solve."""
    def make() -> _GraphState:
        return _GraphState(z, max_iter, tol, stop_mode, make_solver() if make_solver else None)

    entry = _GRAPHS.take(key, make, z.device)
    if entry is None:
        return None
    try:
        gs = entry.state
        tr = gs.tracker
        tr.reset(z, keep_trace)
        gs.x.copy_(z)
        x, last = z, max_iter - 1
        for k in range(max_iter):
            fx = f(x)
            if fx.shape != gs.fx.shape:
                raise ValueError(f"f returned shape {tuple(fx.shape)} for an input of shape {tuple(x.shape)}")
            gs.fx.copy_(fx)
            entry.run(k, functools.partial(step, gs, k, k == last))
            tr.k = k + 1  # a replayed graph does not advance the Python counter
            if k == last or ((k + 1) % every == 0 and tr.done()):
                break
            x = gs.x.clone()
        return tr.stats(shape)
    finally:
        _GRAPHS.give(key, entry)


def _fixed_point_graph_step(gs: _GraphState, k: int, last: bool, damping: float) -> None:
    """Evaluation ``k``'s bookkeeping on a graph state's buffers; the next iterate goes to ``gs.x``."""
    tr = gs.tracker
    tr.update(gs.x, gs.fx, out=gs.res)
    if not last:
        nxt = gs.fx if damping == 1.0 else torch.lerp(gs.x, gs.fx, damping)
        torch.where(tr.diverged[:, None], tr.best, nxt, out=gs.x)


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
    every = check_every or _default_check_every(z)
    if _graphed(z):
        signature = ("fixed_point", *z.shape, z.dtype, z.device, max_iter, tol, stop_mode, damping)
        step = functools.partial(_fixed_point_graph_step, damping=damping)
        out = _graph_solve(signature, g, z, shape, max_iter, tol, stop_mode, keep_trace, every, None, step)
        if out is not None:
            return out
    tr = _Tracker(z, max_iter, tol, stop_mode, keep_trace)
    last = max_iter - 1
    key = ("fixed_point", *z.shape, z.dtype)
    res = _WORKSPACE.take(key, lambda: z.new_empty(z.shape)) if _cached(z) else None  # residual buffer
    for k in range(max_iter):
        fz = g(z)
        if tr.fused and res is not None and _fused_pair(fz, z):
            flags = _fused.score(*tr.fused_args(), fz.data_ptr(), z.data_ptr(), res.data_ptr(), 0, 0, 0)
            tr.fused_done(fz, flags)
            if k == last or ((k + 1) % every == 0 and flags & _ALL_DONE):
                break
        else:
            tr.update(z, fz, out=res if fz.dtype == z.dtype else None)
            if k == last or ((k + 1) % every == 0 and tr.done()):
                break
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
        if tr.any_diverged:
            z = tr.keep_finite(z)
    if res is not None:
        _WORKSPACE.give(key, res, res.numel() * res.element_size())
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
    make = lambda: _AndersonState(x, mem, lam, beta != 1.0)  # noqa: E731
    every = check_every or _default_check_every(x)
    if _graphed(x):
        signature = ("anderson", b, d, x.dtype, x.device, max_iter, tol, stop_mode, mem, lam, beta)
        step = functools.partial(_anderson_graph_step, beta=beta)
        out = _graph_solve(signature, g, x, shape, max_iter, tol, stop_mode, keep_trace, every, make, step)
        if out is not None:
            return out
    key = ("anderson", b, d, mem, x.dtype, lam, beta != 1.0)
    st = _WORKSPACE.take(key, make) if _cached(x) else make()
    G = st.G
    tr = _Tracker(x, max_iter, tol, stop_mode, keep_trace)
    last = max_iter - 1
    fused = tr.fused and mem <= _FUSED_MAX_MEM
    for k in range(max_iter):
        fx = g(x)
        slot = k % mem
        n = min(k + 1, mem)
        if fused and _fused_pair(fx, x):
            if k == last:
                tr.fused_done(
                    fx, _fused.score(*tr.fused_args(), fx.data_ptr(), x.data_ptr(), st.ptrs[0], 0, slot, 0)
                )
                break
            x_new = fx if n == 1 and beta == 1.0 else torch.empty_like(x)
            flags = _fused.anderson(
                *tr.fused_args(),
                fx.data_ptr(),
                x.data_ptr(),
                *st.ptrs,
                st.rows[n - 1].data_ptr(),
                mem,
                n,
                slot,
                lam + _EPS,
                beta,
                0 if x_new is fx else x_new.data_ptr(),
                st.alphas.data_ptr(),
            )
            tr.fused_done(fx, flags)
            if (k + 1) % every == 0 and flags & _ALL_DONE:
                break
            x = tr.keep_finite(x_new) if tr.any_diverged else x_new
            continue
        if k == last:
            tr.update(x, fx, out=G[slot])
            break
        v = st.views.get((slot, n)) or st.make_views(slot, n)
        x_new = _anderson_mix(st, v, tr, fx, x, n, beta)
        if (k + 1) % every == 0 and tr.done():
            break
        x = tr.keep_finite(x_new) if tr.any_diverged else x_new
    if _cached(x):
        _WORKSPACE.give(key, st, st.nbytes)
    return tr.stats(shape)


def _anderson_mix(
    st: _AndersonState, v: _AndersonViews, tr: _Tracker, fx: Tensor, x: Tensor, n: int, beta: float
) -> Tensor:
    """One Anderson evaluation's bookkeeping after ``f``: score ``fx``, add it to the history (slot and
    ``n`` of ``v``) and return the next iterate (before :meth:`_Tracker.keep_finite`)."""
    torch.sub(fx, x, out=v.g_slot)
    # Inner products of the new residual with the stored ones; its own gives its norm for the tracker.
    row = torch.bmm(v.g_row, v.g_hist, out=v.row)  # (b, 1, n)
    r = torch.sqrt(v.row_self, out=tr.abs_row())
    tr.score(fx, r)
    v.f_slot.copy_(fx)
    if st.X is not None:
        v.x_slot.copy_(x)
    # Jacobi scaling by S = diag(1/||g_i||) (floored): the scaled system (S GGᵀ S + lam I) y' = S 1,
    # y = S y', is the one in the docstring, better conditioned. New row (and column) of the scaled
    # matrix: s_k s_i <g_k, g_i> plus (lam + eps) on the diagonal.
    torch.clamp_min(r, _EPS**0.5, out=v.s_slot).reciprocal_()
    row = torch.addcmul(v.lam_row, row, v.s_row * v.s_new)
    v.h_row.copy_(row)
    v.h_col.copy_(row)
    if n == 1:
        return fx if beta == 1.0 else torch.lerp(x, fx, beta)
    A = v.h if tr.all_active else torch.nan_to_num(v.h, nan=0.0, posinf=0.0, neginf=0.0)
    y = torch.linalg.solve_ex(A, v.s)[0].mul_(v.s)
    alpha = y.div_(y.sum(dim=1, keepdim=True)).mT  # (b, 1, n)
    x_new = torch.bmm(alpha, v.f)[:, 0]
    if st.X is not None:
        x_new = torch.lerp(torch.bmm(alpha, v.x)[:, 0], x_new, beta)
    if tr.host and tr.all_active:
        # Every stored candidate is finite, so only non-finite weights make a non-finite mix.
        ok = None if math.isfinite(alpha.sum()) else torch.isfinite(alpha.sum(dim=2))
    else:
        ok = _finite_rows(x_new, tr.host)
    return x_new if ok is None else torch.where(ok, x_new, fx)


def _anderson_graph_step(gs: _GraphState, k: int, last: bool, beta: float) -> None:
    """Evaluation ``k``'s bookkeeping on a graph state's buffers; the next iterate goes to ``gs.x``."""
    st, tr = gs.solver, gs.tracker
    mem = st.F.shape[0]
    slot, n = k % mem, min(k + 1, mem)
    if last:
        tr.update(gs.x, gs.fx, out=st.G[slot])
        return
    v = st.views.get((slot, n)) or st.make_views(slot, n)
    x_new = _anderson_mix(st, v, tr, gs.fx, gs.x, n, beta)
    torch.where(tr.diverged[:, None], tr.best, x_new, out=gs.x)


class _AndersonState:
    """Anderson's buffers and their views, kept between solves of one size (see :class:`_Workspace`).

    History slots are contiguous (mem, b, d) blocks that the batched products see as (b, n, d) views.
    The buffers are left uninitialised: only the first n slots, all written in a solve, are ever read.
    """

    def __init__(self, x: Tensor, mem: int, lam: float, damped: bool) -> None:
        b, d = x.shape
        self.F = x.new_empty(mem, b, d)  # candidates f(x_i)
        self.G = x.new_empty(mem, b, d)  # residuals g_i = f(x_i) - x_i
        self.X = x.new_empty(mem, b, d) if damped else None  # past iterates, only when damping
        self.S = x.new_empty(b, mem, 1)  # S = diag(1 / ||g_i||), floored
        self.H = x.new_empty(b, mem, mem)  # S GGᵀ S + (lam + eps) I, one row/column refreshed per step
        self.lam_eye = torch.eye(mem, dtype=x.dtype, device=x.device).mul_(lam + _EPS)[:, None]
        self.rows = [x.new_empty(b, 1, n) for n in range(1, mem + 1)]  # <g_k, g_i> for each n
        bufs = (self.G, self.F, self.X, self.S, self.H)
        self.ptrs = tuple(0 if t is None else t.data_ptr() for t in bufs)  # for the fused steps
        self.alphas = x.new_empty(b, mem)  # the fused step's mixing weights
        self.nbytes = (3 if damped else 2) * self.F.numel() * self.F.element_size()
        self.views: dict[tuple[int, int], _AndersonViews] = {}

    def make_views(self, slot: int, n: int) -> _AndersonViews:
        with torch.inference_mode(False):  # views that later solves may write through, in any mode
            v = self.views[slot, n] = _AndersonViews(self, slot, n)
        return v


class _AndersonViews:
    """Views of Anderson's buffers for one (slot, n) (the new residual's slot, the number stored)."""

    def __init__(self, st: _AndersonState, slot: int, n: int) -> None:
        F, G, X, S, H = st.F, st.G, st.X, st.S, st.H
        self.g_slot = G[slot]
        self.g_row = G[slot][:, None]  # (b, 1, d)
        self.g_hist = G[:n].permute(1, 2, 0)  # (b, d, n)
        self.row = st.rows[n - 1]
        self.row_self = self.row[:, 0, slot]  # ||g_k||²
        self.f_slot = F[slot]
        self.x_slot = None if X is None else X[slot]
        self.s_slot = S[:, slot, 0]
        self.s_new = S[:, slot : slot + 1]  # the same entries as (b, 1, 1)
        self.s = S[:, :n]  # (b, n, 1)
        self.s_row = S[:, :n].mT  # (b, 1, n)
        self.lam_row = st.lam_eye[slot, :, :n]  # (1, n): (lam + eps) at the diagonal entry of the new row
        self.h_row = H[:, slot : slot + 1, :n]
        self.h_col = H[:, :n, slot : slot + 1].mT
        self.h = H[:, :n, :n]
        self.f = F[:n].transpose(0, 1)  # (b, n, d)
        self.x = None if X is None else X[:n].transpose(0, 1)


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
    ``Δz = -B g`` and the rank-one update is ``B ← B + (Δz - BΔg) Δzᵀ B / (Δzᵀ B Δg)`` (skipped for a
    sample whose denominator is below 1e-12 in magnitude). The final factors are returned in
    ``stats.broyden_factors`` for the ``broyden_reuse`` backward.

    When the memory holds every update (``m`` is ``None`` or at least ``max_iter - 1``), every step, every
    ``u_i`` and every ``v_i`` lies in the span of the residuals ``Q = [g_0, …, g_k]``, so the solver stores
    only ``Q`` (written in place as each residual is scored) and coefficient matrices ``U = Cᵤ Q``,
    ``V = Cᵥ Q``, with the Gram matrix ``QᵀQ`` for inner products: each step reads ``Q`` twice (``Qᵀ g`` and
    the new iterate ``z - Q c``) instead of reading ``U`` and ``V`` twice each, and the other operations
    act on ``(k × k)`` coefficients. ``stats.broyden_factors`` is then a :class:`BroydenFactors` that
    forms ``(U, V)`` on first access. With a smaller ``m``, or with more evaluations than a sample has
    entries (where the coefficients would outgrow the vectors), the factors are kept explicitly, the
    oldest term being overwritten in place when the memory is full.
    """
    check_solver_args(max_iter, tol, stop_mode)
    mem = max_iter if m is None else m
    if mem < 1:
        raise ValueError(f"m must be an integer >= 1 (got {m!r})")
    cap = min(mem, max(max_iter - 1, 1))  # at most max_iter - 1 updates happen
    shape = z0.shape
    if cap < max_iter - 1 or max_iter > shape[1:].numel():
        return _broyden_explicit(f, z0, max_iter, tol, stop_mode, cap, keep_trace, check_every)
    g = _flat(f, shape)
    z = z0.reshape(shape[0], -1)
    b, d = z.shape
    key = ("broyden", b, d, max_iter, z.dtype)
    make = lambda: _BroydenState(z, max_iter)  # noqa: E731
    st = _WORKSPACE.take(key, make) if _cached(z) else make()
    st.reset()
    Q, dz, zero = st.Q, st.dz, st.zero
    tr = _Tracker(z, max_iter, tol, stop_mode, keep_trace)
    every = check_every or _default_check_every(z)
    fused = tr.fused and max_iter <= _FUSED_MAX_K
    for k in range(max_iter):
        fz = g(z)
        if fused and _fused_pair(fz, z):
            done = k == max_iter - 1
            z_new = None if done else torch.empty_like(z)
            flags = _fused.broyden(
                *tr.fused_args(),
                fz.data_ptr(),
                z.data_ptr(),
                *st.ptrs,
                max_iter,
                k,
                int(done),
                0 if z_new is None else z_new.data_ptr(),
            )
            tr.fused_done(fz, flags)
            if done or ((k + 1) % every == 0 and flags & _ALL_DONE):
                break
            z = tr.keep_finite(z_new) if tr.any_diverged else z_new
            continue
        v = st.views[k] if k < len(st.views) else st.make_views(k)
        gz = torch.sub(fz, z, out=Q[k])
        if tr.host:
            # g_kᵀ Q: the new row of the Gram matrix; its last entry gives the residual norm.
            h = torch.bmm(v.q_row, v.q_hist_t)  # (b, 1, N)
            tr.score(fz, torch.sqrt(h[:, 0, k], out=tr.abs_row()))
            if not tr.all_active:  # non-finite residuals are scored as such, then zeroed
                gz.nan_to_num_()
                h = torch.bmm(v.q_row, v.q_hist_t)
        else:  # the device cannot know whether a residual is non-finite without synchronising
            tr.score(fz, torch.linalg.vector_norm(gz, dim=1, out=tr.abs_row()))
            gz.nan_to_num_()
            h = torch.bmm(v.q_row, v.q_hist_t)
        last = k == max_iter - 1 or ((k + 1) % every == 0 and tr.done())
        v.m_row.copy_(h)
        v.m_col.copy_(h)
        h = v.h  # the same row, zero-padded to the width of the coefficient products
        if k == 0:
            bg = v.neg_e  # B g = -g_0
        else:
            # B g_k = -g_k + U (Vᵀ g_k) and v = Bᵀ Δz = -Δz + V (Uᵀ Δz), with Uᵀ Δz = Cᵤ Qᵀ Δz = Cᵤ M [Δz].
            w = torch.bmm(v.dz, v.m)  # Qᵀ Δz (M is symmetric)
            if k == 1:  # no stored term yet: B = -I
                bg = v.neg_e
                vt = torch.neg(v.dz)
            else:  # with UVᵀ = Q Cᵤᵀ Cᵥ Qᵀ = Q K Qᵀ: [B g_k] = -e_k + K h and [Bᵀ Δz] = -[Δz] + Kᵀ w
                bg = torch.baddbmm(v.neg_e, h, v.k.mT)
                vt = torch.baddbmm(v.dz, w, v.k, beta=-1)
            bdg = bg - v.bg_old  # B Δg = B g_k - B g_{k-1}
            denom = torch.bmm(w, bdg.mT)  # Δzᵀ B Δg
            vg = torch.bmm(h, vt.mT)  # vᵀ g_k
            good = denom.abs() > _EPS  # else the update is skipped (u = v = 0)
            u = torch.where(good, (v.dz - bdg) / denom, zero, out=v.cu_new)  # (Δz - BΔg) / denom
            vt = torch.where(good, vt, zero, out=v.cv_new)
            v.k.addcmul_(u.mT, vt)  # K += [u] [v]ᵀ
            if not last:  # B_new g_k = B g_k + u (vᵀ g_k)
                bg = torch.addcmul(bg, u, vg)
        if last:
            break
        if k == 0:
            z_new = fz  # z - B g = z + g_0
            dz[:, :, 0] = 1.0  # Δz = g_0
        else:
            z_new = torch.baddbmm(z[:, None], bg[:, :, : k + 1], v.q_hist, alpha=-1)[:, 0]  # z - Q [B g]
            torch.neg(bg, out=v.dz)  # Δz = -B g
        ok = _finite_rows(z_new, tr.host)
        if ok is not None:
            z_new = torch.where(ok, z_new, fz)
            v.dz.copy_(torch.where(ok[:, :, None], v.dz, -v.neg_e))  # Δz = g_k
        if not tr.all_active:
            # Frozen samples stop moving so their Broyden factors describe their returned point.
            active = tr.active_mask()
            z_new = torch.where(active[:, None], z_new, z)
            v.dz.masked_fill_(~active[:, None, None], 0.0)
        v.bg_old.copy_(bg)
        z = tr.keep_finite(z_new) if tr.any_diverged else z_new
    N = tr.k
    n = N - 1
    factors = BroydenFactors(Q[:N].transpose(0, 1), st.CU[:, :n, :N], st.CV[:, :n, :N], st.UV[:, :N, :N])
    if _cached(z):
        _WORKSPACE.give(key, st, st.nbytes, user=factors)
    return tr.stats(shape, broyden_factors=factors)


class _BroydenState:
    """Broyden's residual basis, coefficients and their views, kept between solves of one size.

    ``Q`` holds the residuals as contiguous (K, b, d) slots; ``M = QᵀQ``; row i of ``CU`` (``CV``) holds the
    coefficients of ``u_i`` (``v_i``) over ``Q``; ``dz`` and ``bg_old`` those of the last step and of the
    last ``B g``. Coefficient rows are zero beyond their length, so they are cleared for each solve.
    """

    def __init__(self, z: Tensor, K: int) -> None:
        b, d = z.shape
        self.K = K
        self.Q = z.new_empty(K, b, d)  # uninitialised: only written slots are read
        self.M = z.new_zeros(b, K, K)  # zero beyond the written rows/columns
        self.CU = z.new_zeros(b, max(K - 1, 1), K)
        self.CV = z.new_zeros(b, max(K - 1, 1), K)
        self.UV = z.new_zeros(b, K, K)  # K = Cᵤᵀ Cᵥ, so that U Vᵀ = Q K Qᵀ
        self.dz = z.new_zeros(b, 1, K)
        self.bg_old = z.new_zeros(b, 1, K)
        self.neg_eye = -torch.eye(K, dtype=z.dtype, device=z.device)[:, None]  # row k: coefficients of -g_k
        self.zero = z.new_zeros(())
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.Q, self.M, self.CU, self.CV, self.UV))
        bufs = (self.Q, self.M, self.CU, self.CV, self.UV, self.dz, self.bg_old)
        self.ptrs = tuple(t.data_ptr() for t in bufs)  # for the fused steps
        self.views: list[_BroydenViews] = []
        self.fresh = True

    def reset(self) -> None:
        if not self.fresh:
            for t in (self.M, self.CU, self.CV, self.UV, self.dz, self.bg_old):
                t.zero_()
        self.fresh = False

    def make_views(self, k: int) -> _BroydenViews:
        with torch.inference_mode(False):  # views that later solves may write through, in any mode
            while len(self.views) <= k:
                self.views.append(_BroydenViews(self, len(self.views)))
        return self.views[k]


class _BroydenViews:
    """Views of Broyden's buffers at evaluation ``k`` (basis g_0 … g_k, terms 0 … k - 2 stored).

    The coefficient products use a width ``W ≥ k + 1`` of at least ``_MIN_WIDTH`` (the coefficients are
    zero beyond ``k + 1``): PyTorch multiplies batches of matrices with fewer than 400 entries by a scalar
    loop, several times slower than the BLAS call it makes for larger ones.
    """

    def __init__(self, st: _BroydenState, k: int) -> None:
        N, n = k + 1, max(k - 1, 0)
        W = min(st.K, max(N, _MIN_WIDTH))
        self.q_row = st.Q[k][:, None]  # (b, 1, d)
        self.q_hist_t = st.Q[:N].permute(1, 2, 0)  # (b, d, N)
        self.q_hist = st.Q[:N].transpose(0, 1)  # (b, N, d)
        self.m_row = st.M[:, k : k + 1, :N]
        self.m_col = st.M[:, :N, k : k + 1].mT
        self.h = st.M[:, k : k + 1, :W]
        self.m = st.M[:, :W, :W]
        self.k = st.UV[:, :W, :W]
        self.cu_new, self.cv_new = st.CU[:, n : n + 1, :W], st.CV[:, n : n + 1, :W]
        self.dz = st.dz[:, :, :W]
        self.bg_old = st.bg_old[:, :, :W]
        self.neg_e = st.neg_eye[k, :, :W]  # (1, W)


class BroydenFactors(Sequence):
    """Broyden's factors ``(U, V)`` kept as ``U = Cᵤ Q``, ``V = Cᵥ Q`` over the residual basis ``Q``
    (``U Vᵀ = Q K Qᵀ`` with ``K = Cᵤᵀ Cᵥ``).

    Behaves as the pair ``(U, V)`` (unpacking, indexing); the (B, m, d) tensors are formed on first
    access. :func:`broyden_transpose_apply` uses ``Q`` and ``K`` directly without forming them. The
    solver's buffers behind it are reused by later solves only once this object is gone.
    """

    def __init__(self, Q: Tensor, CU: Tensor, CV: Tensor, K: Tensor) -> None:
        self._q, self._cu, self._cv, self._k = Q, CU, CV, K
        self._uv: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):  # type: ignore[override]
        if self._uv is None:
            self._uv = (torch.bmm(self._cu, self._q), torch.bmm(self._cv, self._q))
        return self._uv[i]

    def __repr__(self) -> str:
        b, n, N = self._cu.shape
        return f"BroydenFactors(batch={b}, terms={n}, basis={N}, dim={self._q.shape[2]})"


def broyden_transpose_apply(factors: Sequence[Tensor], w: Tensor) -> Tensor:
    """``-Bᵀ w = w - V (Uᵀ w)`` for ``w`` of shape (B, d), with ``B = -I + U Vᵀ`` from ``factors``."""
    if isinstance(factors, BroydenFactors) and factors._uv is None:
        if _fused_tapply(factors, w):
            Q, K = factors._q, factors._k
            out = torch.empty_like(w)
            b, N, d = Q.shape
            _fused.broyden_tapply(
                _FUSED_DTYPES[w.dtype], b, N, d, Q.data_ptr(), Q.stride(0), Q.stride(1),
                K.data_ptr(), K.stride(0), K.stride(1), w.data_ptr(), out.data_ptr(),
            )  # fmt: skip
            return out
        Q = factors._q.to(w.dtype)
        a = torch.bmm(w[:, None], Q.mT)  # Qᵀ w
        return torch.baddbmm(w[:, None], torch.bmm(a, factors._k.to(w.dtype)), Q, alpha=-1)[:, 0]  # Q Kᵀ Qᵀ w
    U, V = factors
    # The vector goes on the left of each batched product (much faster than the other way on the CPU).
    c = torch.bmm(w[:, None], U.to(w.dtype).mT)
    return torch.baddbmm(w[:, None], c, V.to(w.dtype), alpha=-1)[:, 0]


def _fused_tapply(factors: BroydenFactors, w: Tensor) -> bool:
    """Whether :func:`broyden_transpose_apply` can take the fused CPU path: same dtype everywhere, rows
    contiguous, ``w`` a contiguous (B, d) batch, and no graph to record."""
    Q, K = factors._q, factors._k
    return (
        _fused_solve(w)
        and w.dim() == 2
        and Q.dtype == K.dtype == w.dtype
        and Q.device == w.device
        and w.shape == (Q.shape[0], Q.shape[2])
        and 1 <= Q.shape[1] <= _FUSED_MAX_K
        and Q.stride(2) == 1
        and K.stride(2) == 1
        and not (torch.is_grad_enabled() and w.requires_grad)
    )


def _broyden_explicit(
    f: Func,
    z0: Tensor,
    max_iter: int,
    tol: float,
    stop_mode: str,
    cap: int,
    keep_trace: bool,
    check_every: int | None,
) -> tuple[Tensor, SolverStats]:
    """Broyden with at most ``cap < max_iter - 1`` explicit terms in circular buffers ``U``, ``V``.

    Each step applies ``B`` and ``Bᵀ`` once: ``BΔg = B g_new - B g_old`` reuses the previous step's product,
    and the next step ``-B_new g_new`` is that product plus the new rank-one term. When the memory is full
    the oldest term is overwritten (the terms form a sum, so their order does not matter).
    """
    shape = z0.shape
    g = _flat(f, shape)
    z = z0.reshape(shape[0], -1)
    b, d = z.shape
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
