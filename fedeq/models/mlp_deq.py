"""``mlp_deq``: a DEQ on flattened inputs, ``z* = tanh(W z* + U x + b)``, with a spectral-norm contraction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.models.base import config_value, flattened_size
from fedeq.models.classifier import DEQClassifier
from fedeq.registry import MODELS

Tensor = torch.Tensor

__all__ = ["MLPDEQ", "SpectralScale", "build_mlp_deq"]


class SpectralScale(nn.Module):
    """``γ · W / σ_max(W)`` with one power-iteration step per training forward (persistent vector).

    The scaled matrix is computed once per model call, not per solver iteration, so the map the solver
    sees is fixed during a solve.
    """

    def __init__(self, dim: int, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("u", F.normalize(torch.randn(dim), dim=0))

    @torch.no_grad()
    def warm_up(self, w: Tensor, steps: int = 30) -> None:
        """Run power iterations so the estimate is accurate from the first call."""
        for _ in range(steps):
            self.u.copy_(F.normalize(w @ F.normalize(w.T @ self.u, dim=0), dim=0))

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            v = F.normalize(w.T @ self.u, dim=0)
            u = F.normalize(w @ v, dim=0)
            if self.training:
                self.u.copy_(u)
        sigma = u @ w @ v
        return w * (self.gamma / sigma.clamp_min(1e-12))


class MLPDEQ(DEQClassifier):
    """DEQ for flattened inputs: ``z* = tanh(W z* + U x + b)``, logits ``= head(z*)``.

    With ``contraction = γ < 1`` the weight is rescaled to spectral norm ``γ``, so the fixed point is unique
    and every solver converges; accuracy then does not drop as the evaluation budget grows. The injection
    is ``c = (U x + b, W)``: the rescaled weight is computed once per call, not per solver iteration.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        contraction: float | None = 0.9,
        **deq_settings: Any,
    ) -> None:
        if contraction is not None and not 0 < contraction < 1:
            raise ValueError(f"contraction must be in (0, 1) or None (got {contraction!r})")
        super().__init__(**deq_settings)
        self.hidden = hidden
        self.inject = nn.Linear(in_features, hidden)
        self.weight = nn.Parameter(torch.randn(hidden, hidden) * (0.5 / hidden**0.5))
        self.scale = SpectralScale(hidden, contraction) if contraction is not None else None
        if self.scale is not None:
            self.scale.warm_up(self.weight)
        self.head = nn.Linear(hidden, num_classes)

    def injection(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.scale(self.weight) if self.scale is not None else self.weight
        return self.inject(x.flatten(1)), w

    def cell(self, z: Tensor, c: tuple[Tensor, Tensor]) -> Tensor:
        """``tanh(z Wᵀ + u)``; a contraction when ``||W||₂ < 1`` since ``|tanh'| ≤ 1``."""
        u, w = c
        return torch.tanh(torch.addmm(u, z, w.T))

    def init_state(self, c: tuple[Tensor, Tensor]) -> Tensor:
        return torch.zeros_like(c[0])


@MODELS.register("mlp_deq")
def build_mlp_deq(
    input_shape: tuple[int, ...], num_classes: int, cfg: Any, contraction: float | None = 0.9
) -> nn.Module:
    """Registry factory: ``hidden`` from ``cfg`` (default 64); option ``contraction`` (``model.kwargs``)."""
    hidden = config_value(cfg, "hidden", 64)
    return MLPDEQ(flattened_size(input_shape), num_classes, hidden=hidden, contraction=contraction)
