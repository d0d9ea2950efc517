"""``conv_deq``: a small multiscale-DEQ-style convolutional classifier for images of any size.

Three parts, in the style of MDEQ (Bai et al., 2020) and TorchDEQ's reference models:

- a convolutional *stem* ``u = inject(x)``: a 3×3 conv to ``C`` channels, then ``downsample`` stages of
  GroupNorm, ReLU and a stride-2 3×3 conv (each halves the resolution); its output is the injection ``u``;
- a residual *cell* of ``blocks`` blocks (the equilibrium map ``z* = f(z*, u)``). One block is

      y = ReLU(GN₁(W₁ ∗ z)),    f(z, u) = GN₃(ReLU(z + GN₂(W₂ ∗ y + u))),

  with weight-normalised convolutions ``W = g · V / ||V||`` (one norm per output channel, as TorchDEQ's
  default norm). The final GroupNorm fixes the scale of every iterate (up to its learned affine map), so
  no budget can make the state blow up; the gains ``g`` of ``W₂`` start at 0.1, so at initialisation
  ``f`` is close to ``z ↦ GN₃(ReLU(z + GN₂(u)))`` and the solvers reach small residuals in a few steps.
  Nothing forces a contraction during training: the fixed-point residual is reported per call
  (``out.deq.forward``). Blocks after the first take no injection;
- a *readout* that keeps spatial layout: ReLU(GN(z)), a stride-2 3×3 conv to ``2C`` channels, adaptive
  average pooling to a ``readout_grid × readout_grid`` grid, and a linear layer.

It is a :class:`~fedeq.models.DEQClassifier` (``injection``, ``cell``, ``readout``, initial state
``z₀ = 0``): budgets, solver and backward mode come from its :class:`~fedeq.deq.DEQ` layer and can be
overridden per call (``model(x, f_max_iter=k)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.models.base import config_value
from fedeq.models.classifier import DEQClassifier
from fedeq.registry import MODELS

Tensor = torch.Tensor

__all__ = ["ConvBlock", "ConvDEQ", "WNConv2d", "build_conv_deq", "group_count"]


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels``: the largest of 8, 4, 2, 1 that divides it."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels)


class WNConv2d(nn.Conv2d):
    """Bias-free 3×3 convolution with weight normalisation, ``W_o = g_o · V_o / ||V_o||₂`` per output
    channel ``o`` (``V`` is the stored ``weight``; ``g`` starts at ``gain``)."""

    def __init__(self, in_channels: int, out_channels: int, gain: float = 1.0) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain)))

    def normalized_weight(self) -> Tensor:
        v = self.weight
        return v * (self.gain / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.normalized_weight(), None)


class ConvBlock(nn.Module):
    """One residual block ``f(z, u) = GN₃(ReLU(z + GN₂(W₂ ∗ ReLU(GN₁(W₁ ∗ z)) + u)))`` (``u`` may be 0)."""

    def __init__(self, channels: int, expansion: int = 1, out_gain: float = 0.1) -> None:
        super().__init__()
        inner = channels * expansion
        self.conv1 = WNConv2d(channels, inner)
        self.conv2 = WNConv2d(inner, channels, gain=out_gain)
        self.gn1, self.gn2, self.gn3 = _gn(inner), _gn(channels), _gn(channels)

    def forward(self, z: Tensor, u: Tensor | None) -> Tensor:
        y = self.conv2(F.relu(self.gn1(self.conv1(z))))
        if u is not None:
            y = y + u
        return self.gn3(F.relu(z + self.gn2(y)))


class ConvDEQ(DEQClassifier):
    """Convolutional DEQ classifier for images of any size (8×8, 28×28, 32×32, ...).

    Args:
        in_channels, num_classes: input channels and classes.
        channels: equilibrium width ``C``.
        downsample: stride-2 stages in the stem (the equilibrium runs at ``H / 2^downsample``).
        blocks: residual blocks in the cell (its depth).
        expansion: inner width multiplier of each block (``C · expansion`` channels between its convs).
        readout_grid: side of the pooled grid the linear readout sees.
        **deq_settings: :class:`~fedeq.deq.DEQSettings` fields (solver, budgets, backward mode, ...).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 24,
        downsample: int = 1,
        blocks: int = 1,
        expansion: int = 1,
        readout_grid: int = 4,
        **deq_settings: Any,
    ) -> None:
        for name, value, low in [
            ("channels", channels, 1),
            ("downsample", downsample, 0),
            ("blocks", blocks, 1),
            ("expansion", expansion, 1),
            ("readout_grid", readout_grid, 1),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low} (got {value!r})")
        super().__init__(**deq_settings)
        stem: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for _ in range(downsample):
            stem += [
                _gn(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
            ]
        self.inject = nn.Sequential(*stem)
        self.blocks = nn.ModuleList(ConvBlock(channels, expansion) for _ in range(blocks))
        wide = 2 * channels
        self.head = nn.Sequential(
            _gn(channels),
            nn.ReLU(),
            nn.Conv2d(channels, wide, 3, stride=2, padding=1, bias=False),
            _gn(wide),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(readout_grid),
            nn.Flatten(),
            nn.Linear(wide * readout_grid**2, num_classes),
        )

    def injection(self, x: Tensor) -> Tensor:
        """``u = inject(x)``: the stem's (B, C, H / 2^downsample, W / 2^downsample) feature map."""
        return self.inject(x)

    def cell(self, z: Tensor, c: Tensor) -> Tensor:
        """The residual blocks in sequence, the injection ``c`` entering the first."""
        for i, block in enumerate(self.blocks):
            z = block(z, c if i == 0 else None)
        return z


@MODELS.register("conv_deq")
def build_conv_deq(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory: ``channels`` (default 24), ``downsample`` (1), ``blocks`` (1), ``expansion`` (1)
    and ``readout_grid`` (4) from ``cfg``."""
    sizes = {
        key: int(config_value(cfg, key, default))
        for key, default in [
            ("channels", 24),
            ("downsample", 1),
            ("blocks", 1),
            ("expansion", 1),
            ("readout_grid", 4),
        ]
    }
    return ConvDEQ(int(input_shape[0]), num_classes, **sizes)
