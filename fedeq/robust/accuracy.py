"""Clean and robust accuracy of a model under an attack, optionally behind an inference-time defense."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedeq.robust.attacks import AttackConfig, TemporaryEvalMode, run_attack
from fedeq.robust.ball import sample_norms

Tensor = torch.Tensor

__all__ = ["RobustStats", "robust_accuracy"]


@dataclass
class RobustStats:
    """Clean and adversarial accuracy / loss on a data set."""

    num_examples: int
    clean_acc: float
    robust_acc: float
    clean_loss: float
    robust_loss: float
    mean_perturbation: float
    """Mean ``||x_adv - x||_p`` in the attack's norm."""

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def _to_tensors(x: Any, y: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    xt = x if isinstance(x, Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
    yt = y if isinstance(y, Tensor) else torch.from_numpy(np.array(y, dtype=np.int64))
    return xt.to(device).float(), yt.to(device).long()


def robust_accuracy(
    model: nn.Module,
    x: Any,
    y: Any,
    attack: AttackConfig,
    *,
    deq: Mapping[str, Any] | None = None,
    attack_deq: Mapping[str, Any] | None = None,
    predict: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> RobustStats:
    """Clean and robust accuracy of ``model`` under ``attack`` (the attack sees ``model`` with ``deq``).

    ``attack_deq`` (default ``deq``) gives the attack other DEQ settings than the evaluation, e.g. a
    smaller forward budget to attack an intermediate state while predicting from the equilibrium.
    ``predict(x) -> logits`` replaces ``model(x, **deq).logits`` for the final predictions on clean and
    adversarial inputs (an inference-time defense such as entropy-reducing input updates); the attack
    itself is computed on the undefended model.
    """
    device = torch.device(device)
    model.to(device)
    xt, yt = _to_tensors(x, y, device)
    n = int(xt.shape[0])
    if n == 0:
        nan = float("nan")
        return RobustStats(0, nan, nan, nan, nan, nan)
    deq = dict(deq or {})
    atk_deq = deq if attack_deq is None else {**deq, **dict(attack_deq)}
    gen = torch.Generator().manual_seed(seed)

    def _predict(xb: Tensor) -> Tensor:
        if predict is not None:
            return predict(xb)
        with torch.no_grad():
            return model(xb, **deq).logits

    sums = np.zeros(5)  # clean correct, robust correct, clean loss, robust loss, perturbation
    with TemporaryEvalMode(model):
        for start in range(0, n, batch_size):
            xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
            res = run_attack(model, xb, yb, attack, deq=atk_deq, generator=gen)
            clean = _predict(xb).detach()
            adv = _predict(res.x_adv).detach()
            sums += (
                float((clean.argmax(1) == yb).sum()),
                float((adv.argmax(1) == yb).sum()),
                float(F.cross_entropy(clean, yb, reduction="sum")),
                float(F.cross_entropy(adv, yb, reduction="sum")),
                float(sample_norms(res.x_adv - xb, attack.norm).sum()),
            )
    s = sums / n
    return RobustStats(n, s[0], s[1], s[2], s[3], s[4])
