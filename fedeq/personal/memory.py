"""A measure of a client's training memory that does not depend on the allocator or the machine.

``ActivationMeter`` counts the bytes of the tensors autograd saves for the backward pass (the activations,
not the parameters, whose storage it recognises); per optimisation step this is the memory that an explicit
deep network grows with its depth and that a DEQ with implicit gradients keeps constant (FeDEQ's memory
claim). :func:`training_memory` adds the weights, their gradients and the optimizer's moments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ActivationMeter", "OPTIMIZER_MOMENTS", "training_memory"]

OPTIMIZER_MOMENTS = {"adam": 2, "sgd": 1}
"""Tensors of the parameters' size each optimizer keeps (Adam: two moments; SGD: the momentum buffer)."""


@dataclass
class ActivationMeter:
    """Bytes of the non-parameter tensors saved for backward while :meth:`watch` is active."""

    saved_bytes: int = 0

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[ActivationMeter]:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in params:
                self.saved_bytes += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self


def training_memory(model: nn.Module, optimizer: str, activation_bytes_per_step: float) -> int:
    """``weights + gradients + optimizer moments`` of all the model's parameters (an upper bound for a phase
    that freezes some), plus the activations one step saves, in bytes."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(
            f"train.optimizer: unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZER_MOMENTS)}"
        )
    moments = OPTIMIZER_MOMENTS[optimizer]
    return int(weights * (2 + moments) + activation_bytes_per_step)
