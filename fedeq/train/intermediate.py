"""Random intermediate states (Yang, Pang, Chen, Lin, ICML 2023, Sec. 3.3).

Instead of the equilibrium, every training forward of the model (the clean term, each step of the attack,
the adversarial term) draws its own ``k ~ U{1, …, K}`` (``K`` = the forward budget) and uses the state
reached after ``k`` solver evaluations, differentiated with the unrolled phantom gradient of the authors'
code, whatever backward mode the device tier names:

    z_k = solve(f(·, x), z_0, k)                  (no graph; the tier's solver, tolerance, stop mode)
    z   = f(z_k, x)                                (one full step from the detached z_k)
    z   ← (1 - λ) z + λ f(z, x)   (s times)        (λ = 0.5, s = 5: the reference's damped steps)
    logits = readout(z)

Autograd runs through the ``1 + s`` steps only. The implicit gradient (``ift``) would assume ``z_k`` is a
fixed point, which it is not for small ``k``. The model needs an exposed equilibrium map (``parts()``;
:func:`fedeq.models.parts.deq_parts`); :func:`check_intermediate_states` refuses the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedeq.deq.backward import BackwardStats
from fedeq.deq.layer import DEQOutput
from fedeq.deq.solvers import solve
from fedeq.models.base import ModelOutput
from fedeq.models.parts import deq_parts

Tensor = torch.Tensor

__all__ = ["RandomIntermediate", "check_intermediate_states", "intermediate_forward"]

#: The reference's unrolled gradient: one full step, then ``UNROLL_STEPS`` steps damped by ``DAMPING``.
UNROLL_STEPS = 5
DAMPING = 0.5


def check_intermediate_states(model: nn.Module) -> None:
    """``ValueError`` unless ``model`` exposes the equilibrium map random intermediate states need."""
    try:
        deq_parts(model)
    except TypeError:
        raise ValueError(
            f"random intermediate states need a DEQ with an exposed equilibrium map (parts()); "
            f"{type(model).__name__} has none"
        ) from None


def intermediate_forward(
    model: nn.Module,
    x: Tensor,
    k: int,
    deq: Mapping[str, Any] | None = None,
    unroll_steps: int = UNROLL_STEPS,
    damping: float = DAMPING,
) -> ModelOutput:
    """Logits of the state after ``k`` solver evaluations with the unrolled gradient (module docstring).

    ``deq`` holds the call's overrides (solver, tolerance, ...; ``f_max_iter`` is replaced by ``k``).
    """
    parts = deq_parts(model)
    call = {n: v for n, v in dict(deq or {}).items() if n != "jac_reg_samples"}
    s = parts.settings.override(**call)
    c = parts.inject(x)
    with torch.no_grad():
        z_k, stats = solve(
            lambda z: parts.cell(z, c), parts.z0(c), s.solver, int(k), s.tol, s.stop_mode, **s.solver_options
        )
    z = parts.cell(z_k.detach().requires_grad_(torch.is_grad_enabled()), c)
    for _ in range(unroll_steps):
        z = torch.lerp(z, parts.cell(z, c), damping)
    steps = 1 + unroll_steps
    back = BackwardStats(mode="unrolled", ready=True, nfe=steps) if z.requires_grad else None
    out = DEQOutput(z, stats, back, s.override(f_max_iter=int(k)), graph_evals=steps)
    return ModelOutput(parts.readout(z), out)


class RandomIntermediate(nn.Module):
    """``model`` where every call draws ``k ~ U{1..K}`` from ``generator`` and returns
    :func:`intermediate_forward` at ``k`` (``K`` = the call's ``f_max_iter``, else the model's)."""

    def __init__(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_intermediate_states(model)
        self.model = model
        self.generator = generator
        self.last_k = 0
        self.train(model.training)  # the wrapper starts in the model's mode (attacks restore it)

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        budget = deq_overrides.get("f_max_iter") or deq_parts(self.model).settings.f_max_iter
        k = int(torch.randint(1, int(budget) + 1, (1,), generator=self.generator))
        self.last_k = k
        return intermediate_forward(self.model, x, k, deq_overrides)
