"""The server-side loss that the ``server_val`` quality function scores updates with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedeq.arrays import record_to_state_dict
from fedeq.train import evaluate

__all__ = ["ServerEvaluator"]


class ServerEvaluator:
    """``evaluator(arrays) -> ℓ``: mean cross-entropy ℓ = (1/m) Σ_k CE(f_θ(x_k), y_k) of ``model`` with the
    weights ``arrays`` on the server's split ``(x, y)``, at the DEQ ``settings`` (solver, budgets, tolerance).

    ``model`` is the evaluator's own copy (it is overwritten on every call).
    """

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        device: torch.device | str = "cpu",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if len(y) == 0:
            raise ValueError("ServerEvaluator needs a non-empty validation split (data.server_val_fraction)")
        self.model = model
        self.x, self.y = x, y
        self.device = device
        self.settings = dict(settings or {})

    def __call__(self, arrays: ArrayRecord) -> float:
        self.model.load_state_dict(record_to_state_dict(arrays))
        return float(evaluate(self.model, self.x, self.y, device=self.device, **self.settings).loss)
