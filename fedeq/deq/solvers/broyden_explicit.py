"""Broyden with explicit factors ``U``, ``V`` in circular buffers (memory below the evaluation budget)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedeq.deq.solvers.base import EPS
from fedeq.deq.solvers.iterate import Tracker, finite_rows

Tensor = torch.Tensor


def kept_terms(term: Tensor, best: Tensor) -> Tensor | None:
    """``(B, n)`` mask of the rank-one terms (numbered ``term``, the update of evaluation ``j`` being term
    ``j - 1``) made up to each sample's returned evaluation ``best``; ``None`` when every term is kept
    (known on the CPU without a device synchronisation)."""
    keep = term[None, :] < best[:, None]
    if best.device.type == "cpu" and bool(keep.all()):
        return None
    return keep


class ExplicitBroydenState:
    """At most ``cap`` rank-one terms of ``B = -I + U Vᵀ`` stored explicitly, shape (B, cap, d) each.

    Each step applies ``B`` and ``Bᵀ`` once: ``BΔg = B g_new - B g_old`` reuses the previous step's product,
    and the next step ``-B_new g_new`` is that product plus the new rank-one term. When the memory is full
    the oldest term is overwritten (the terms form a sum, so their order does not matter).
    """

    def __init__(self, z: Tensor, cap: int) -> None:
        b, d = z.shape
        self.cap = cap
        self.U = z.new_empty(b, cap, d)  # uninitialised: only the n stored terms are read
        self.V = z.new_empty(b, cap, d)
        self.n = 0  # stored rank-one terms
        self.slot = 0  # where the next term goes
        self.ids = [0] * cap  # the number of the term in each slot (the update of evaluation j is j - 1)
        self.count = 0  # terms made so far
        # The last step Δz is kept as `dz_step` with Δz = sign * dz_step: a plain step Δz = -B g_old is
        # stored as B g_old with sign -1 (no negated copy); a corrected one as z_new - z with sign 1.
        self.bg_old: Tensor | None = None
        self.dz_step: Tensor | None = None
        self.sign = 1.0
        self.gz: Tensor | None = None
        self.g_last: Tensor | None = None  # the residual of the last step (for the outer updates)

    def residual(self, k: int, z: Tensor, fz: Tensor, track: Tracker) -> Tensor:
        self.gz = fz - z
        return torch.linalg.vector_norm(self.gz, dim=1, out=track.abs_row())

    def step(self, k: int, z: Tensor, fz: Tensor, track: Tracker, last: bool) -> Tensor | None:
        gz = self.gz if track.all_active else torch.nan_to_num(self.gz)
        self.gz = None
        self.g_last = gz
        U, V, n, cap, slot = self.U, self.V, self.n, self.cap, self.slot
        step, sign = self.dz_step, self.sign
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
            if sign < 0 and track.host:
                # Plain step: Δzᵀ BΔg = Δzᵀ(B g - B g_old) = vᵀg + ||Δz||² and Δz - BΔg = -B g.
                denom = torch.linalg.vecdot(step, step)[:, None].sub_(vg)
                if float(denom.abs().min()) > EPS:
                    u = Bg * denom.reciprocal_().neg_()
                    v = vT
                    vg = vg.neg_()
            if u is None:
                dz = step * sign
                Bdg = Bg - self.bg_old
                denom = torch.linalg.vecdot(dz, Bdg)[:, None]
                good = denom.abs() > EPS
                u = torch.where(good, (dz - Bdg) / torch.where(good, denom, 1.0), 0.0)
                v = torch.where(good, vT, 0.0)
                vg = torch.where(good, vg * sign, 0.0)
            if n == cap and not last:  # the oldest term is overwritten: drop it from B g as well
                Bg = Bg.addcmul_(U[:, slot], c[:, :, slot], value=-1)
            U[:, slot] = u
            V[:, slot] = v
            self.ids[slot] = self.count
            self.count += 1
            self.slot = (slot + 1) % cap
            self.n = min(n + 1, cap)
            if not last:  # B_new g = B_old g + u (vᵀ g)
                Bg = Bg.addcmul_(u, vg)
        if last:
            return None
        z_new = z - Bg
        ok = finite_rows(z_new, track.host)
        if ok is not None:
            z_new = torch.where(ok, z_new, fz)
        if not track.all_active:
            # Frozen samples stop moving so their Broyden factors describe their returned point.
            z_new = torch.where(track.active_mask()[:, None], z_new, z)
        if ok is None and track.all_active:
            self.dz_step, self.sign = Bg, -1.0
        else:
            self.dz_step, self.sign = z_new - z, 1.0
        self.bg_old = Bg
        return z_new

    def apply(self, x: Tensor) -> Tensor:
        """``B x = -x + U (Vᵀ x)`` over the stored terms, ``x`` of shape (B, d)."""
        if self.n == 0:
            return -x
        U, V = self.U[:, : self.n], self.V[:, : self.n]
        return torch.baddbmm(x[:, None], torch.bmm(x[:, None], V.mT), U, beta=-1)[:, 0]

    def apply_t(self, x: Tensor) -> Tensor:
        """``Bᵀ x = -x + V (Uᵀ x)`` over the stored terms."""
        if self.n == 0:
            return -x
        U, V = self.U[:, : self.n], self.V[:, : self.n]
        return torch.baddbmm(x[:, None], torch.bmm(x[:, None], U.mT), V, beta=-1)[:, 0]

    def outer_update(self, k: int, vjp: Callable[[Tensor], Tensor], grad: Tensor, track: Tracker) -> None:
        """The outer-problem-aware term after the step of evaluation ``k`` (see
        :class:`~fedeq.deq.solvers.broyden.Broyden`): ``σ = B grad``, ``y = J_gᵀσ = vjp(σ) - σ``,
        ``B ← B + u vᵀ`` with ``u = Bσ``, ``v = (σ - Bᵀy) / (yᵀu)``; stopped samples get none."""
        sigma = self.apply(grad)
        active = None if track.all_active else track.active_mask()[:, None]
        if active is not None:
            sigma = torch.where(active, sigma, 0.0)
        y = vjp(sigma) - sigma
        u = self.apply(sigma)
        denom = torch.linalg.vecdot(y, u)[:, None]
        good = torch.isfinite(denom) & (denom.abs() > EPS * torch.linalg.vecdot(sigma, sigma)[:, None])
        if active is not None:
            good &= active
        v = torch.where(good, (sigma - self.apply_t(y)) / torch.where(good, denom, 1.0), 0.0)
        u = torch.where(good, u, 0.0)
        slot = self.slot
        self.U[:, slot] = u
        self.V[:, slot] = v
        self.ids[slot] = k - 1  # kept for the backward with the update of evaluation k
        self.slot = (slot + 1) % self.cap
        self.n = min(self.n + 1, self.cap)
        # The next step's secant pair needs B g_k with the new B, and the general form of Δz.
        if self.g_last is not None:
            self.bg_old = self.apply(self.g_last)
        if self.dz_step is not None and self.sign != 1.0:
            self.dz_step, self.sign = self.dz_step * self.sign, 1.0

    def factors(self, N: int, best: Tensor) -> tuple[Tensor, Tensor]:
        """The stored terms ``(U, V)``, each (B, n, d), with the terms made after each sample's returned
        evaluation ``best[b]`` zeroed (terms that such later ones overwrote are not recovered)."""
        U, V = self.U[:, : self.n], self.V[:, : self.n]
        keep = kept_terms(torch.tensor(self.ids[: self.n], device=best.device), best)
        if keep is not None:
            U = U * keep[:, :, None].to(U.dtype)
        return U, V
