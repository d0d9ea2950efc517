"""``broyden_reuse``: the adjoint from the forward Broyden estimate, no extra function evaluations."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fedeq.deq.backward.base import BackwardStats, HookBackward
from fedeq.deq.solvers import broyden_transpose_apply
from fedeq.registry import BACKWARDS

if TYPE_CHECKING:
    from fedeq.deq.layer import DEQSettings
    from fedeq.deq.solvers import SolverStats

Tensor = torch.Tensor


@BACKWARDS.register("broyden_reuse")
class BroydenReuse(HookBackward):
    """``g ≈ -Bᵀ w`` with ``B ≈ (J_f - I)^{-1}`` the forward Broyden estimate (``stats.broyden_factors``);
    per sample it falls back to ``g = w`` (JFB) when ``||g|| > c·||w||`` (``c`` = ``reuse_threshold``)."""

    requires_solver = "broyden"

    def hook(
        self, z_in: Tensor, fz: Tensor, forward: SolverStats, settings: DEQSettings, stats: BackwardStats
    ) -> Callable[[Tensor], Tensor]:
        threshold = settings.reuse_threshold

        def hook(w: Tensor) -> Tensor:
            wf = w.reshape(w.shape[0], -1)
            g = broyden_transpose_apply(forward.broyden_factors, wf)  # type: ignore[arg-type]  # -Bᵀ w
            fallback = ~(g.norm(dim=1) <= threshold * wf.norm(dim=1))
            g = torch.where(fallback[:, None], wf, g)
            stats.fallback = fallback
            stats.ready = True
            return g.reshape_as(w)

        return hook
