"""Central evaluation of the global model on the test split, and its anytime curve after the last round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedeq.arrays import record_to_state_dict
from fedeq.results.recorder import RunRecorder
from fedeq.train import accuracy_vs_budget, evaluate

from .base import RoundCallback

__all__ = ["BudgetCurve", "CentralEvaluation"]


class CentralEvaluation(RoundCallback):
    """Evaluate every round's global model on ``(x_test, y_test)``.

    Returns ``test_acc``, ``test_loss`` and ``test_residual`` at the ``reference`` tier's DEQ settings and
    ``test_acc@<tier>`` at each tier's (``tier_settings``: tier name -> settings). The initial model's
    accuracy goes to the recorder as ``initial_test_acc``.
    """

    def __init__(
        self,
        model: nn.Module,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        device: torch.device,
        tier_settings: Mapping[str, Mapping[str, Any]],
        reference: str,
        recorder: RunRecorder,
    ) -> None:
        self.model = model
        self.x_test, self.y_test = x_test, y_test
        self.device = device
        self.tier_settings = dict(tier_settings)
        self.reference = reference
        self.recorder = recorder

    def after_round(
        self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]
    ) -> dict[str, float]:
        self.model.load_state_dict(record_to_state_dict(arrays))
        main_settings = self.tier_settings[self.reference]
        main = evaluate(self.model, self.x_test, self.y_test, device=self.device, **main_settings)
        evals = {"test_acc": main.accuracy, "test_loss": main.loss, "test_residual": main.fp_residual}
        for name, settings in self.tier_settings.items():
            if settings == main_settings:  # the reference tier's own row: already evaluated
                evals[f"test_acc@{name}"] = main.accuracy
                continue
            st = evaluate(self.model, self.x_test, self.y_test, device=self.device, **settings)
            evals[f"test_acc@{name}"] = st.accuracy
        if server_round == 0:
            self.recorder.extra["initial_test_acc"] = main.accuracy
        return evals


class BudgetCurve(RoundCallback):
    """After round ``final_round``: test accuracy of the global model at each forward budget of
    ``budgets`` (solver and tolerance in ``settings``), kept as the recorder's ``curve``."""

    def __init__(
        self,
        model: nn.Module,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        device: torch.device,
        budgets: Sequence[int],
        settings: Mapping[str, Any],
        final_round: int,
        recorder: RunRecorder,
    ) -> None:
        self.model = model
        self.x_test, self.y_test = x_test, y_test
        self.device = device
        self.budgets = list(budgets)
        self.settings = dict(settings)
        self.final_round = final_round
        self.recorder = recorder

    def after_round(self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]) -> None:
        if server_round != self.final_round:
            return None
        self.model.load_state_dict(record_to_state_dict(arrays))
        self.recorder.curve = accuracy_vs_budget(
            self.model, self.x_test, self.y_test, self.budgets, device=self.device, **self.settings
        )
        return None
