"""Where training runs: device resolution, moving a model and its data there, seeding its RNGs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available; allowed: auto, cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be one of auto, cpu, cuda (got {name!r})")
    return torch.device(name)


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global RNG the model may draw from (CPU, and CUDA when training there).

    Same effect on the CPU as ``torch.manual_seed``, which also queues a seeding of every lazily initialised
    accelerator backend and records a stack trace each time (~0.6 ms per call, a per-client cost here).
    """
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def move_to(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to(device)``, skipped when every parameter and buffer is there already (``Module.to``
    walks the whole module tree, a per-call cost for a client's small model)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device
        device = torch.device("cuda", torch.cuda.current_device())
    if any(t.device != device for t in itertools.chain(model.parameters(), model.buffers())):
        model.to(device)
    return model


def examples_on(
    x: Any, y: Any, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` as ``dtype`` inputs (a model's parameter dtype) and integer labels on ``device`` (arrays
    are converted, tensors moved)."""
    xt = x if isinstance(x, Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
    yt = y if isinstance(y, Tensor) else torch.from_numpy(np.array(y, dtype=np.int64))
    xt, yt = xt.to(device), yt.to(device)
    return xt.to(dtype), yt.long()


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s first parameter (float32 for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32
