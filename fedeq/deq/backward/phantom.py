"""``phantom``: autograd through a few damped unrolled steps from the equilibrium."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fedeq.deq.backward.base import Backward, BackwardStats
from fedeq.registry import BACKWARDS

if TYPE_CHECKING:
    from fedeq.deq.layer import DEQSettings
    from fedeq.deq.solvers import SolverStats

Tensor = torch.Tensor


@BACKWARDS.register("phantom")
class Phantom(Backward):
    """``k`` damped steps ``z ← (1-λ) z + λ f(z, x)`` from ``z*`` with autograd through them (``k`` = the
    backward budget unless ``phantom_steps`` is set, ``λ`` = ``phantom_damping``)."""

    def attach(
        self,
        step: Callable[[Tensor], Tensor],
        z_in: Tensor,
        fz: Tensor,
        forward: SolverStats,
        settings: DEQSettings,
        stats: BackwardStats,
    ) -> tuple[Tensor, int]:
        z_out, steps = phantom_unroll(step, z_in, fz, settings)
        stats.nfe = steps
        stats.ready = True
        return z_out, steps


def phantom_unroll(
    step: Callable[[Tensor], Tensor], z_in: Tensor, fz: Tensor, s: DEQSettings
) -> tuple[Tensor, int]:
    """The ``phantom`` gradient path: ``k`` damped steps ``z ← (1-λ) z + λ step(z)`` from ``z_in`` whose first
    evaluation ``fz = step(z_in)`` is given; returns ``(z_k, k)``."""
    steps = s.phantom_steps or s.b_max_iter
    z_out = torch.lerp(z_in, fz, s.phantom_damping)
    for _ in range(steps - 1):
        z_out = torch.lerp(z_out, step(z_out), s.phantom_damping)
    return z_out, steps
