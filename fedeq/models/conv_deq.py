"""``conv_deq``: a convolutional DEQ classifier (MDEQ-style residual cell) for images of any size."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq import DEQ
from fedeq.models.base import ModelOutput, config_value
from fedeq.registry import MODELS

Tensor = torch.Tensor

__all__ = ["ConvCell", "ConvDEQ", "build_conv_deq", "group_count"]


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels``: the largest of 8, 4, 2, 1 that divides it."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvCell(nn.Module):
    """Residual conv block with input injection and GroupNorm (MDEQ-style):
    ``f(z, u) = GN(relu(z + GN(conv₂(relu(GN(conv₁ z))) + u)))``."""

    def __init__(self, channels: int, hidden_mult: int = 1) -> None:
        super().__init__()
        inner = channels * hidden_mult
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(group_count(inner), inner, affine=True)
        self.gn2 = nn.GroupNorm(group_count(channels), channels, affine=True)
        self.gn3 = nn.GroupNorm(group_count(channels), channels, affine=True)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = F.relu(self.gn1(self.conv1(z)))
        y = self.gn2(self.conv2(y) + u)
        return self.gn3(F.relu(z + y))


class ConvDEQ(nn.Module):
    """Convolutional DEQ classifier for images of any size (8×8, 28×28, 32×32, ...)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 16, **deq_settings: Any) -> None:
        super().__init__()
        self.inject = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(channels), channels),
        )
        self.deq = DEQ(ConvCell(channels), **deq_settings)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        u = self.inject(x)
        out = self.deq(u, torch.zeros_like(u), **deq_overrides)
        return ModelOutput(self.head(out.z.mean(dim=(2, 3))), out)


@MODELS.register("conv_deq")
def build_conv_deq(
    input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]
) -> nn.Module:
    """Registry factory: ``channels`` from ``cfg`` (default 16)."""
    return ConvDEQ(input_shape[0], num_classes, channels=config_value(cfg, "channels", 16), **deq)
