"""Anderson acceleration (type II) with a Jacobi-scaled, Tikhonov-regularised mixing problem."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedeq.deq.solvers.base import EPS, Solver
from fedeq.deq.solvers.iterate import Tracker, finite_rows
from fedeq.deq.solvers.workspace import WORKSPACE
from fedeq.registry import SOLVERS

Tensor = torch.Tensor


@SOLVERS.register("anderson")
@dataclass(frozen=True, kw_only=True)
class Anderson(Solver):
    """Anderson acceleration with memory ``m``, Tikhonov ``lam`` and mixing ``beta``.

    With ``G = [g_{k-n+1}, …, g_k]`` the last residuals ``g_i = f(x_i) - x_i``, the mixing weights solve
    ``min_α ||Gα||² + lam Σ_i ||g_i||² α_i²`` s.t. ``Σα = 1`` (a per-column relative Tikhonov term), i.e.
    ``α = y / Σy`` with ``(GGᵀ + lam·diag(GGᵀ)) y = 1``, and the next iterate is
    ``x_{k+1} = β Σ α_i f(x_i) + (1 - β) Σ α_i x_i``. The Gram matrix is updated one row per step
    (O(B·m·d) per evaluation); its diagonal entry gives the residual norm.
    """

    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m < 1:
            raise ValueError(f"m must be an integer >= 1 (got {self.m!r})")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0 (got {self.lam!r})")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1] (got {self.beta!r})")

    def init(self, z: Tensor, max_iter: int) -> _AndersonState:
        b, d = z.shape
        mem = min(self.m, max_iter)
        key = ("anderson", b, d, mem, z.dtype, self.lam, self.beta != 1.0)
        st = WORKSPACE.take(key, z, lambda: _AndersonState(z, mem, self.lam, self.beta != 1.0))
        st.begin(key, z, max_iter)
        return st

    def residual(self, st: _AndersonState, k: int, z: Tensor, fz: Tensor, track: Tracker) -> Tensor:
        slot = k % st.mem
        if k == st.max_iter - 1:  # no mixing follows: the plain norm
            return torch.linalg.vector_norm(torch.sub(fz, z, out=st.G[slot]), dim=1, out=track.abs_row())
        v = st.views.get((slot, min(k + 1, st.mem))) or st.make_views(slot, min(k + 1, st.mem))
        torch.sub(fz, z, out=v.g_slot)
        # Inner products of the new residual with the stored ones; its own gives its norm.
        torch.bmm(v.g_row, v.g_hist, out=v.row)  # (b, 1, n)
        return torch.sqrt(v.row_self, out=track.abs_row())

    def step(
        self, st: _AndersonState, k: int, x: Tensor, fx: Tensor, track: Tracker, last: bool
    ) -> Tensor | None:
        if last:
            return None
        n = min(k + 1, st.mem)
        v = st.views[k % st.mem, n]
        beta = self.beta
        v.f_slot.copy_(fx)
        if st.X is not None:
            v.x_slot.copy_(x)
        # Jacobi scaling by S = diag(1/||g_i||) (floored): the scaled system (S GGᵀ S + lam I) y' = S 1,
        # y = S y', is the one in the docstring, better conditioned. New row (and column) of the scaled
        # matrix: s_k s_i <g_k, g_i> plus (lam + eps) on the diagonal.
        torch.clamp_min(track.abs_tr[k], EPS**0.5, out=v.s_slot).reciprocal_()
        row = torch.addcmul(v.lam_row, v.row, v.s_row * v.s_new)
        v.h_row.copy_(row)
        v.h_col.copy_(row)
        if n == 1:
            return fx if beta == 1.0 else torch.lerp(x, fx, beta)
        A = v.h if track.all_active else torch.nan_to_num(v.h, nan=0.0, posinf=0.0, neginf=0.0)
        y = torch.linalg.solve_ex(A, v.s)[0].mul_(v.s)
        alpha = y.div_(y.sum(dim=1, keepdim=True)).mT  # (b, 1, n)
        x_new = torch.bmm(alpha, v.f)[:, 0]
        if st.X is not None:
            x_new = torch.lerp(torch.bmm(alpha, v.x)[:, 0], x_new, beta)
        if track.host and track.all_active:
            # Every stored candidate is finite, so only non-finite weights make a non-finite mix.
            ok = None if math.isfinite(alpha.sum()) else torch.isfinite(alpha.sum(dim=2))
        else:
            ok = finite_rows(x_new, track.host)
        return x_new if ok is None else torch.where(ok, x_new, fx)

    def finish(self, st: _AndersonState, track: Tracker) -> dict[str, Any]:
        WORKSPACE.give(st.key, st.like, st, st.nbytes)
        st.like = None
        return {}


class _AndersonState:
    """Anderson's buffers and their views, kept between solves of one size (see :mod:`.workspace`).

    History slots are contiguous (mem, b, d) blocks that the batched products see as (b, n, d) views.
    The buffers are left uninitialised: only the first n slots, all written in a solve, are ever read.
    """

    def __init__(self, x: Tensor, mem: int, lam: float, damped: bool) -> None:
        b, d = x.shape
        self.mem = mem
        self.F = x.new_empty(mem, b, d)  # candidates f(x_i)
        self.G = x.new_empty(mem, b, d)  # residuals g_i = f(x_i) - x_i
        self.X = x.new_empty(mem, b, d) if damped else None  # past iterates, only when damping
        self.S = x.new_empty(b, mem, 1)  # S = diag(1 / ||g_i||), floored
        self.H = x.new_empty(b, mem, mem)  # S GGᵀ S + (lam + eps) I, one row/column refreshed per step
        self.lam_eye = torch.eye(mem, dtype=x.dtype, device=x.device).mul_(lam + EPS)[:, None]
        self.rows = [x.new_empty(b, 1, n) for n in range(1, mem + 1)]  # <g_k, g_i> for each n
        self.nbytes = (3 if damped else 2) * self.F.numel() * self.F.element_size()
        self.views: dict[tuple[int, int], _AndersonViews] = {}
        self.key: Any = None
        self.like: Tensor | None = None
        self.max_iter = 0

    def begin(self, key: Any, like: Tensor, max_iter: int) -> None:
        """Start a solve of ``max_iter`` evaluations (the pool key and a tensor of its device)."""
        self.key, self.like, self.max_iter = key, like, max_iter

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
