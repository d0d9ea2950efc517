"""``tied_conv``: a convolutional weight-tied model with a distinct sparse mask per layer.

The vision model of Song, Majumder & Lin ("Revisiting Implicit Models"): one convolution block whose kernel
``K`` is shared by all ``L`` unrolled layers, with the input injected at every layer,

    u = stem(x),      z₀ = relu(u),      z_{l+1} = relu(GN(conv(z_l, M_l ⊙ K) / √p) + u),

and ``logits = head(pool(z_L))``. ``GN`` is a group normalization whose affine weights are tied too (no
running statistics: nothing but trained weights travels). ``M_l`` is layer ``l``'s binary mask over the
kernel (:mod:`~fedeq.models.masks`): ``unstructured`` entries of the C × C × k × k kernel or ``row`` output
channels, with an optional ``mask_overlap`` between consecutive layers (1: one shared mask, the
weight-tied model with a single mask). Every layer applies its mask to a non-zero state, the first one too.
Budgets and statistics are those of :class:`~fedeq.models.tied.TiedMLP`: ``f_max_iter`` caps the layers run,
``b_max_iter`` the layers back-propagated (1 for ``jfb``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq import DEQSettings
from fedeq.models.base import config_value
from fedeq.models.masks import MaskSpec
from fedeq.models.tied import MaskedLayers
from fedeq.registry import MODELS

Tensor = torch.Tensor

__all__ = ["TiedConv", "build_tied_conv"]


class TiedConv(MaskedLayers):
    """Convolutional weight-tied model (module docstring).

    Args:
        in_channels, num_classes: input channels and number of classes.
        channels: width ``C`` of the tied block.
        depth: number of unrolled layers ``L``.
        kernel_size: odd side of the tied kernel.
        stride: stride of the stem (2 halves the maps the tied block runs on).
        pool: side of the average-pooled grid the linear head reads.
        mask_density, mask_pattern, mask_seed, mask_overlap: the masks (:class:`~fedeq.models.masks.MaskSpec`
            fields).
        **deq_settings: fields of :class:`fedeq.deq.DEQSettings`; budgets default to ``depth``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 16,
        depth: int = 4,
        kernel_size: int = 3,
        stride: int = 1,
        pool: int = 4,
        mask_density: float = 1.0,
        mask_pattern: str = "unstructured",
        mask_seed: int = 0,
        mask_overlap: float | None = None,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        for key, value, low in (("depth", depth, 1), ("channels", channels, 1), ("stride", stride, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low} (got {value!r})")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1 (got {kernel_size!r})")
        spec = MaskSpec(mask_density, mask_pattern, mask_seed, mask_overlap).validate()
        self.depth = depth
        self.settings = DEQSettings().override(**{"f_max_iter": depth, "b_max_iter": depth, **deq_settings})
        self.stem = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
        fan_in = channels * kernel_size**2
        self.kernel = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size) / fan_in**0.5)
        self.norm = nn.GroupNorm(min(4, channels), channels)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(channels * pool**2, num_classes)
        )
        self._init_masks(tuple(self.kernel.shape), spec)

    def _inject(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def _start(self, u: Tensor) -> Tensor:
        return F.relu(u)

    def _layer(self, layer: int, z: Tensor, u: Tensor) -> Tensor:
        k = self.kernel if self._dense else self.kernel * self.masks[layer].to(self.kernel.dtype)
        return F.relu(self.norm(F.conv2d(z, k, padding=k.shape[-1] // 2)) + u)


@MODELS.register("tied_conv")
def build_tied_conv(
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: Any,
    channels: int | None = None,
    depth: int | None = None,
    mask_density: float = 1.0,
    mask_pattern: str = "unstructured",
    mask_seed: int = 0,
    mask_overlap: float | None = None,
    stride: int | None = None,
) -> nn.Module:
    """Registry factory for ``tied_conv``: ``channels``/``depth`` from ``model.kwargs`` or else ``cfg``; the
    masks from ``model.kwargs``; ``stride`` 2 for inputs of side ≥ 16 unless given. A bad option raises
    ``ValueError`` naming ``model.kwargs.<key>``; so does a ``model.mask_*`` key set away from its default
    (those belong to ``tied_sparse``; ignoring them would silently train a dense model)."""
    fields = getattr(type(cfg), "model_fields", {})
    for key in ("mask_density", "mask_pattern", "mask_seed"):
        if key in fields and getattr(cfg, key) != fields[key].default:
            raise ValueError(
                f"model.{key}={getattr(cfg, key)} is not read by tied_conv; give it as model.kwargs.{key}"
            )
    try:
        return TiedConv(
            int(input_shape[0]),
            num_classes,
            channels=int(config_value(cfg, "channels", 16)) if channels is None else channels,
            depth=int(config_value(cfg, "depth", 4)) if depth is None else depth,
            stride=(2 if min(input_shape[-2:]) >= 16 else 1) if stride is None else stride,
            mask_density=mask_density,
            mask_pattern=mask_pattern,
            mask_seed=mask_seed,
            mask_overlap=mask_overlap,
        )
    except ValueError as exc:  # every message starts with the option's name
        raise ValueError(f"model.kwargs.{exc}") from None
