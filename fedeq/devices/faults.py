"""Fault injection for clients: raise, hang, or reply with NaN weights (seeded per call)."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

import numpy as np
import torch

FAULT_KINDS = ("raise", "hang", "nan")


class InjectedFault(RuntimeError):
    """The error an injected ``raise`` fault throws."""


def draw_fault(faults: Any, seed: int) -> str | None:
    """Draw ``raise``, ``hang`` or ``nan`` with probabilities ``raise_p``, ``hang_p``, ``nan_p`` (else None).

    One uniform draw from ``seed`` decides, so the same run seed, round and partition give the same fault.
    """
    u = float(np.random.default_rng(seed).random())
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += float(getattr(faults, f"{kind}_p"))
        if u < edge:
            return kind
    return None


def before_training(kind: str | None, faults: Any) -> None:
    """Apply a fault that happens before any work: raise, or hang for ``faults.hang_s`` seconds."""
    if kind == "raise":
        raise InjectedFault("injected fault: client raised")
    if kind == "hang":
        time.sleep(float(faults.hang_s))


def poison(state: MutableMapping[str, torch.Tensor]) -> None:
    """Make the first floating-point tensor NaN (a broken update the server must reject)."""
    for key, value in state.items():
        if torch.is_floating_point(value):
            state[key] = torch.full_like(value, float("nan"))
            return
