"""Fixed binary masks, one per unrolled layer, for the weight-tied models (:mod:`~fedeq.models.tied`).

Layer ``l`` keeps ``k = max(1, round(p·n))`` of the ``n`` units of the shared weight (density ``p``): the
entries (``unstructured``) or the output rows / output channels (``row``). Overlap between consecutive
layers is controlled by ``overlap ∈ [0, 1]``:

- ``None``: every layer draws its own ``k`` units independently (expected overlap ``p``);
- a number ``o``: layer ``l ≥ 1`` keeps exactly ``round(o·k)`` units of layer ``l - 1`` and draws the other
  ``k - round(o·k)`` among the units layer ``l - 1`` dropped, so ``|M_l ∩ M_{l-1}| / k = round(o·k) / k``.
  ``o = 1`` gives one shared mask for every layer; ``o = 0`` disjoint consecutive masks (needs ``p ≤ 1/2``).

Layer ``l`` draws from a generator seeded ``seed·1009 + l``, so the masks follow from ``(density, pattern,
seed, overlap)``: the persistent scalars that travel in a federated round (:class:`MaskSpec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

__all__ = ["MASK_PATTERNS", "MaskSpec", "make_layer_masks", "mask_overlap"]

MASK_PATTERNS: tuple[str, ...] = ("unstructured", "row")


@dataclass(frozen=True)
class MaskSpec:
    """What determines the masks: density ``p``, pattern, seed and consecutive-layer overlap."""

    density: float = 1.0
    pattern: str = "unstructured"
    seed: int = 0
    overlap: float | None = None

    def validate(self, prefix: str = "") -> MaskSpec:
        """``ValueError`` naming ``<prefix>mask_<field>`` for a bad value."""
        if self.pattern not in MASK_PATTERNS:
            allowed = ", ".join(MASK_PATTERNS)
            raise ValueError(f"{prefix}mask_pattern must be one of {allowed} (got {self.pattern!r})")
        if not _is_number(self.density) or not 0 < self.density <= 1:
            raise ValueError(f"{prefix}mask_density must be in (0, 1] (got {self.density!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{prefix}mask_seed must be an integer >= 0 (got {self.seed!r})")
        if self.overlap is not None and (not _is_number(self.overlap) or not 0 <= self.overlap <= 1):
            raise ValueError(f"{prefix}mask_overlap must be in [0, 1] or None (got {self.overlap!r})")
        return self


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def make_layer_masks(shape: tuple[int, ...], depth: int, spec: MaskSpec) -> Tensor:
    """``depth`` binary masks of the weight shape ``shape`` (module docstring); ones when ``p = 1``."""
    spec.validate()
    masks = torch.ones(depth, *shape)
    if spec.density >= 1:
        return masks
    n = shape[0] if spec.pattern == "row" else math.prod(shape)
    k = max(1, round(spec.density * n))
    if spec.overlap is not None and depth > 1:
        shared = round(spec.overlap * k)
        if k - shared > n - k:
            least = (2 * k - n) / k
            raise ValueError(
                f"mask_overlap {spec.overlap} is too small for mask_density {spec.density}: "
                f"consecutive masks share at least {least:.3f} of their units"
            )
    prev: Tensor | None = None
    for layer in range(depth):
        gen = torch.Generator().manual_seed(int(spec.seed) * 1009 + layer)
        if prev is None or spec.overlap is None:
            keep = torch.randperm(n, generator=gen)[:k]
        else:
            kept, dropped = prev.nonzero().flatten(), (~prev).nonzero().flatten()
            shared = round(spec.overlap * k)
            old = kept[torch.randperm(len(kept), generator=gen)[:shared]]
            new = dropped[torch.randperm(len(dropped), generator=gen)[: k - shared]]
            keep = torch.cat([old, new])
        units = torch.zeros(n, dtype=torch.bool)
        units[keep] = True
        prev = units
        unit_mask = units.float()
        if spec.pattern == "row":
            masks[layer] = unit_mask.view(n, *([1] * (len(shape) - 1))).expand(shape)
        else:
            masks[layer] = unit_mask.view(shape)
    return masks


def mask_overlap(a: Tensor, b: Tensor) -> float:
    """``|a ∩ b| / |a|``: the share of ``a``'s kept entries that ``b`` keeps too."""
    a, b = a.ne(0), b.ne(0)
    return float((a & b).sum()) / max(int(a.sum()), 1)
