"""Damped fixed-point iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedeq.deq.solvers.base import Solver
from fedeq.deq.solvers.iterate import Tracker
from fedeq.deq.solvers.workspace import WORKSPACE
from fedeq.registry import SOLVERS

Tensor = torch.Tensor


@SOLVERS.register("fixed_point")
@dataclass(frozen=True, kw_only=True)
class FixedPoint(Solver):
    """``z_{k+1} = (1 - β) z_k + β f(z_k)`` with β = ``damping`` ∈ (0, 1]."""

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1] (got {self.damping!r})")

    def init(self, z: Tensor, max_iter: int) -> Any:
        key = ("fixed_point", *z.shape, z.dtype)
        return key, z, WORKSPACE.take(key, z, lambda: z.new_empty(z.shape))  # a residual buffer

    def residual(self, state: Any, k: int, z: Tensor, fz: Tensor, track: Tracker) -> Tensor:
        res = state[2]
        gz = torch.sub(fz, z, out=res) if fz.dtype == z.dtype else fz - z
        return torch.linalg.vector_norm(gz, dim=1, out=track.abs_row())

    def step(self, state: Any, k: int, z: Tensor, fz: Tensor, track: Tracker, last: bool) -> Tensor | None:
        if last:
            return None
        return fz if self.damping == 1.0 else torch.lerp(z, fz, self.damping)

    def finish(self, state: Any, track: Tracker) -> dict[str, Any]:
        key, like, res = state
        WORKSPACE.give(key, like, res, res.numel() * res.element_size())
        return {}
