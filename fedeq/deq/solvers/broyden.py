"""Limited-memory ("good") Broyden, and its inverse-Jacobian factors for the ``broyden_reuse`` gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedeq.deq.solvers.base import EPS, OuterGradient, Solver
from fedeq.deq.solvers.broyden_explicit import ExplicitBroydenState, kept_terms
from fedeq.deq.solvers.iterate import Tracker, finite_rows
from fedeq.deq.solvers.workspace import WORKSPACE
from fedeq.registry import SOLVERS

Tensor = torch.Tensor

_MIN_WIDTH = 20  # coefficient products at least this wide take PyTorch's BLAS path (see _BroydenViews)


@SOLVERS.register("broyden")
@dataclass(frozen=True, kw_only=True)
class Broyden(Solver):
    """Limited-memory Broyden on ``g(z) = f(z) - z = 0``.

    The inverse Jacobian estimate is ``B = -I + U Vᵀ`` (rank ≤ ``m``, default ``max_iter``); the step is
    ``Δz = -B g`` and the rank-one update is ``B ← B + (Δz - BΔg) Δzᵀ B / (Δzᵀ B Δg)`` (skipped for a
    sample whose denominator is below 1e-12 in magnitude). ``stats.broyden_factors`` holds, per sample, the
    estimate as of its returned candidate: the update made at the evaluation that scored it is the last one
    kept, later ones (after a residual increase, or a divergence) are dropped, for the ``broyden_reuse``
    backward.

    When the memory holds every update (``m`` is ``None`` or at least ``max_iter - 1``), every step, every
    ``u_i`` and every ``v_i`` lies in the span of the residuals ``Q = [g_0, …, g_k]``, so the solver stores
    only ``Q`` (written in place as each residual is scored) and coefficient matrices ``U = Cᵤ Q``,
    ``V = Cᵥ Q``, with the Gram matrix ``QᵀQ`` for inner products: each step reads ``Q`` twice (``Qᵀ g`` and
    the new iterate ``z - Q c``) instead of reading ``U`` and ``V`` twice each, and the other operations
    act on ``(k × k)`` coefficients. ``stats.broyden_factors`` is then a :class:`BroydenFactors` that
    forms ``(U, V)`` on first access. With a smaller ``m``, or with more evaluations than a sample has
    entries (where the coefficients would outgrow the vectors), the factors are kept explicitly
    (:class:`~fedeq.deq.solvers.broyden_explicit.ExplicitBroydenState`).

    Outer-problem awareness (``solve(..., outer=OuterGradient(grad, every))``, SHINE's OPA): after the step
    of each evaluation ``k > 1`` that is a multiple of ``every`` (not the last of the budget), at the
    iterate ``z_k`` that evaluation scored, with ``σ = B ∇L(z_k)``, ``y = J_gᵀ σ`` (one VJP through that
    evaluation), ``u = Bσ`` and ``v = (σ - Bᵀy) / (yᵀu)``, the rank-one term ``u vᵀ`` is added, so that
    ``Bᵀy = σ`` holds exactly (adjoint-secant update; the scale of ``σ`` does not matter). The step already
    taken is kept; later steps use the new estimate. The term is kept for the backward like the update of
    evaluation ``k``. Samples that stopped get no term. The factors are then kept explicitly.
    """

    m: int | None = None

    default_backward_solver: ClassVar[str | None] = "anderson"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m is not None and self.m < 1:
            raise ValueError(f"m must be an integer >= 1 (got {self.m!r})")

    def init(self, z: Tensor, max_iter: int) -> Any:
        mem = max_iter if self.m is None else self.m
        cap = min(mem, max(max_iter - 1, 1))  # at most max_iter - 1 updates happen
        if cap < max_iter - 1 or max_iter > z.shape[1]:
            return ExplicitBroydenState(z, cap)
        b, d = z.shape
        key = ("broyden", b, d, max_iter, z.dtype)
        st = WORKSPACE.take(key, z, lambda: _BroydenState(z, max_iter))
        st.begin(key, z)
        return st

    def init_outer(self, z: Tensor, max_iter: int, outer: OuterGradient) -> Any:
        """Explicit factors (the outer-problem-aware terms leave the span of the residuals that the
        compact state stores), with room for those terms when the memory holds every update."""
        base = max(max_iter - 1, 1)
        cap = base + outer.count(max_iter) if self.m is None or self.m >= base else self.m
        return ExplicitBroydenState(z, cap)

    def outer_update(
        self, state: Any, k: int, z: Tensor, vjp: Callable[[Tensor], Tensor], grad: Tensor, track: Tracker
    ) -> None:
        state.outer_update(k, vjp, grad, track)

    def residual(self, state: Any, k: int, z: Tensor, fz: Tensor, track: Tracker) -> Tensor:
        return state.residual(k, z, fz, track)

    def step(self, state: Any, k: int, z: Tensor, fz: Tensor, track: Tracker, last: bool) -> Tensor | None:
        return state.step(k, z, fz, track, last)

    def finish(self, state: Any, track: Tracker) -> dict[str, Any]:
        return {"broyden_factors": state.factors(track.k, track.best_index())}


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
        self.views: list[_BroydenViews] = []
        self.fresh = True
        self.key: Any = None
        self.like: Tensor | None = None
        self.h: Tensor | None = None  # the Gram row of the last residual

    def begin(self, key: Any, like: Tensor) -> None:
        """Start a solve: clear the coefficients a previous one left (pool key, a tensor of the device)."""
        if not self.fresh:
            for t in (self.M, self.CU, self.CV, self.UV, self.dz, self.bg_old):
                t.zero_()
        self.fresh = False
        self.key, self.like = key, like

    def make_views(self, k: int) -> _BroydenViews:
        with torch.inference_mode(False):  # views that later solves may write through, in any mode
            while len(self.views) <= k:
                self.views.append(_BroydenViews(self, len(self.views)))
        return self.views[k]

    def residual(self, k: int, z: Tensor, fz: Tensor, track: Tracker) -> Tensor:
        v = self.views[k] if k < len(self.views) else self.make_views(k)
        gz = torch.sub(fz, z, out=self.Q[k])
        if track.host:  # g_kᵀ Q: the new row of the Gram matrix; its last entry gives the residual norm
            self.h = torch.bmm(v.q_row, v.q_hist_t)  # (b, 1, N)
            return torch.sqrt(self.h[:, 0, k], out=track.abs_row())
        return torch.linalg.vector_norm(gz, dim=1, out=track.abs_row())

    def step(self, k: int, z: Tensor, fz: Tensor, track: Tracker, last: bool) -> Tensor | None:
        v = self.views[k]
        gz = self.Q[k]
        if not track.host:  # the device cannot know whether a residual is non-finite without synchronising
            gz.nan_to_num_()
            h = torch.bmm(v.q_row, v.q_hist_t)
        elif not track.all_active:  # non-finite residuals were scored as such; now they are zeroed
            gz.nan_to_num_()
            h = torch.bmm(v.q_row, v.q_hist_t)
        else:
            h = self.h
        self.h = None
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
            good = denom.abs() > EPS  # else the update is skipped (u = v = 0)
            u = torch.where(good, (v.dz - bdg) / denom, self.zero, out=v.cu_new)  # (Δz - BΔg) / denom
            vt = torch.where(good, vt, self.zero, out=v.cv_new)
            v.k.addcmul_(u.mT, vt)  # K += [u] [v]ᵀ
            if not last:  # B_new g_k = B g_k + u (vᵀ g_k)
                bg = torch.addcmul(bg, u, vg)
        if last:
            return None
        if k == 0:
            z_new = fz  # z - B g = z + g_0
            self.dz[:, :, 0] = 1.0  # Δz = g_0
        else:
            z_new = torch.baddbmm(z[:, None], bg[:, :, : k + 1], v.q_hist, alpha=-1)[:, 0]  # z - Q [B g]
            torch.neg(bg, out=v.dz)  # Δz = -B g
        ok = finite_rows(z_new, track.host)
        if ok is not None:
            z_new = torch.where(ok, z_new, fz)
            v.dz.copy_(torch.where(ok[:, :, None], v.dz, -v.neg_e))  # Δz = g_k
        if not track.all_active:
            # Frozen samples stop moving so their Broyden factors describe their returned point.
            active = track.active_mask()
            z_new = torch.where(active[:, None], z_new, z)
            v.dz.masked_fill_(~active[:, None, None], 0.0)
        v.bg_old.copy_(bg)
        return z_new

    def factors(self, N: int, best: Tensor) -> BroydenFactors:
        """The factors after ``N`` evaluations, keeping per sample the ``best[b]`` updates made up to its
        returned evaluation ``best[b]`` (:func:`kept_terms`); the buffers stay lent to them until they are
        gone."""
        n = N - 1
        cu, cv, uv = self.CU[:, :n, :N], self.CV[:, :n, :N], self.UV[:, :N, :N]
        keep = kept_terms(torch.arange(n, device=best.device), best)
        if keep is not None:  # K = Cᵤᵀ Cᵥ over the kept terms only
            cu = cu * keep[:, :, None].to(cu.dtype)
            uv = torch.bmm(cu.mT, cv)
        factors = BroydenFactors(self.Q[:N].transpose(0, 1), cu, cv, uv)
        WORKSPACE.give(self.key, self.like, self, self.nbytes, user=factors)
        self.like = None
        return factors


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
        Q = factors._q.to(w.dtype)
        a = torch.bmm(w[:, None], Q.mT)  # Qᵀ w
        return torch.baddbmm(w[:, None], torch.bmm(a, factors._k.to(w.dtype)), Q, alpha=-1)[:, 0]  # Q Kᵀ Qᵀ w
    U, V = factors
    # The vector goes on the left of each batched product (much faster than the other way on the CPU).
    c = torch.bmm(w[:, None], U.to(w.dtype).mT)
    return torch.baddbmm(w[:, None], c, V.to(w.dtype), alpha=-1)[:, 0]


def broyden_apply(factors: Sequence[Tensor], x: Tensor) -> Tensor:
    """``-B x = x - U (Vᵀ x)`` for ``x`` of shape (B, d), with ``B = -I + U Vᵀ`` from ``factors``."""
    if isinstance(factors, BroydenFactors) and factors._uv is None:
        Q = factors._q.to(x.dtype)
        a = torch.bmm(x[:, None], Q.mT)  # Qᵀ x
        return torch.baddbmm(x[:, None], torch.bmm(a, factors._k.mT.to(x.dtype)), Q, alpha=-1)[:, 0]
    U, V = factors
    c = torch.bmm(x[:, None], V.to(x.dtype).mT)
    return torch.baddbmm(x[:, None], c, U.to(x.dtype), alpha=-1)[:, 0]
