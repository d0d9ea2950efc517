"""Evaluation under a solver budget, and the anytime curve (accuracy against the forward budget)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.data import batches
from fedeq.train.device import examples_on, move_to, parameter_dtype
from fedeq.train.solver_stats import solver_stats


@dataclass
class EvalStats:
    """Mean loss, accuracy, residual and forward evaluations of a model on a data set."""

    num_examples: int
    loss: float
    accuracy: float
    fp_residual: float
    nfe_fwd: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    **deq_overrides: Any,
) -> EvalStats:
    """Mean cross-entropy, accuracy, residual and forward evaluations on ``(x, y)``."""
    device = torch.device(device)
    move_to(model, device).eval()
    xt, yt = examples_on(x, y, device, parameter_dtype(model))
    n = int(xt.shape[0])
    if n == 0:
        return EvalStats(0, float("nan"), float("nan"), float("nan"), float("nan"))
    loss = correct = res = nfe = 0.0
    for xb, yb in batches(xt, yt, batch_size):
        out = model(xb, **deq_overrides)
        loss += float(F.cross_entropy(out.logits, yb, reduction="sum"))
        correct += float((out.logits.argmax(dim=1) == yb).sum())
        r, nf, _ = solver_stats(out)
        res += r * xb.shape[0]
        nfe += nf * xb.shape[0]
    return EvalStats(n, loss / n, correct / n, res / n, nfe / n)


def accuracy_vs_budget(
    model: nn.Module,
    x: Any,
    y: Any,
    budgets: Sequence[int] = (1, 2, 4, 8, 16, 32),
    *,
    device: torch.device | str = "cpu",
    **deq_overrides: Any,
) -> list[dict[str, float]]:
    """The anytime curve: one row per forward budget with accuracy, loss, residual and evaluations used."""
    rows = []
    for k in budgets:
        st = evaluate(model, x, y, device=device, **{**deq_overrides, "f_max_iter": int(k)})
        rows.append({"budget": int(k), **st.as_dict()})
    return rows
