"""``explicit``: the non-DEQ baseline, ``depth`` stacked blocks with untied weights."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fedeq.models.base import ModelOutput, config_value, flattened_size
from fedeq.registry import MODELS

Tensor = torch.Tensor

__all__ = ["ExplicitMLP", "build_explicit"]


class ExplicitMLP(nn.Module):
    """Explicit baseline: ``depth`` stacked, non-tied blocks ``z ← tanh(W_l z + U x + b_l)``, ``z₀ = 0``."""

    supports_cohorts: ClassVar[bool] = True
    """Its forward vectorizes over clients (:mod:`fedeq.train.cohort_model`)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (got {depth!r})")
        self.inject = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=True) for _ in range(depth))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, **_: Any) -> ModelOutput:
        u = self.inject(x.flatten(1))
        z = torch.zeros_like(u)
        for layer in self.layers:
            z = torch.tanh(layer(z) + u)
        return ModelOutput(self.head(z))


@MODELS.register("explicit")
def build_explicit(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory: ``hidden`` and ``depth`` from ``cfg`` (defaults 64 and 3)."""
    return ExplicitMLP(
        flattened_size(input_shape),
        num_classes,
        hidden=config_value(cfg, "hidden", 64),
        depth=config_value(cfg, "depth", 3),
    )
