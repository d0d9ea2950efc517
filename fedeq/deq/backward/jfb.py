"""``jfb``: Jacobian-free backprop, one step ``z = f(z*, x)`` (the adjoint is ``g = w``)."""

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


@BACKWARDS.register("jfb")
class JFB(Backward):
    """The gradient of one evaluation ``f(z*, x)`` at the detached equilibrium."""

    def attach(
        self,
        step: Callable[[Tensor], Tensor],
        z_in: Tensor,
        fz: Tensor,
        forward: SolverStats,
        settings: DEQSettings,
        stats: BackwardStats,
    ) -> tuple[Tensor, int]:
        return fz, 1
