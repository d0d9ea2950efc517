"""Entropy-reducing input updates along the DEQ dynamics (Yang, Pang, Chen, Lin, ICML 2023, Sec. 3.2).

An inference-time defense. With ``f(z, x) = cell(z, inject(x))`` and readout ``h``, the forward solve is
split into ``T`` stages of ``S`` solver evaluations (the authors' schedule: ``S = 2``, ``T = K/2`` for a
budget ``K``). Between two stages the input takes ``R`` sign steps down the prediction entropy of the next
state, from the given input ``x₀``:

    x ← clip_[lo, hi]( Proj_{B∞(x₀, ρ)}( x - η · sign(∇_x H(softmax(h(f(z_t, x))))) ) ),

and the solver goes on from its current iterate with the updated input, keeping its memory (Anderson's
history, Broyden's low-rank factors): the staged solve is one run of the solver on a map whose input
changes between evaluations. The prediction is the readout of the last evaluation, ``h(f(z_{K-1}, x_T))``:
no extra solve follows the last stage.

:func:`entropy_predictor` plugs the defense into :func:`fedeq.robust.robust_accuracy`; the adaptive attack
that differentiates through it is :func:`fedeq.robust.adaptive.bpda_attack`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedeq.deq.solvers import solve
from fedeq.models.parts import deq_parts, entropy
from fedeq.robust import TemporaryEvalMode, project

Tensor = torch.Tensor

__all__ = ["EntropyDefense", "entropy_defense_fn", "entropy_predictor", "entropy_reduced_inputs"]


@dataclass(frozen=True)
class EntropyDefense:
    """The defense's schedule (module docstring).

    ``stage_iters`` (``S``) solver evaluations per stage; ``stages`` (``T``; ``None``: budget // S); after
    every stage but the last, ``updates`` (``R``) sign steps of size ``step_size`` (``η``) on the input,
    kept within ``radius`` (``ρ``, L∞; ``None``: ``(T-1)·R·η``) of the given input and inside ``clamp``.
    The authors use ``S = 2``, ``R = 10``, ``η = 2/255``, ``ρ = 8/255`` on CIFAR-10.
    """

    stages: int | None = None
    updates: int = 10
    step_size: float = 0.01
    radius: float | None = 0.1
    stage_iters: int = 2
    clamp: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"stages must be >= 1 or None (got {self.stages!r})")
        if self.stage_iters < 1 or self.updates < 0 or not self.step_size > 0:
            raise ValueError("stage_iters must be >= 1, updates >= 0 and step_size > 0")

    def num_stages(self, budget: int) -> int:
        """``T`` for a forward budget of ``budget`` evaluations (at least one stage)."""
        return self.stages if self.stages is not None else max(1, budget // self.stage_iters)

    @property
    def bound(self) -> float:
        """``ρ`` when it does not depend on the budget (``inf`` without ``radius`` and ``stages``)."""
        if self.radius is None and self.stages is None:
            return float("inf")
        return self.bound_for(1)

    def bound_for(self, budget: int) -> float:
        """``ρ`` for a forward budget of ``budget`` evaluations."""
        if self.radius is not None:
            return self.radius
        return (self.num_stages(budget) - 1) * self.updates * self.step_size


def entropy_reduced_inputs(
    model: nn.Module,
    x: Tensor,
    defense: EntropyDefense,
    deq: Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(final inputs, logits)`` of the defense (module docstring) on a batch."""
    parts = deq_parts(model)
    s = parts.settings.override(**{k: v for k, v in dict(deq or {}).items() if k != "jac_reg_samples"})
    stages = defense.num_stages(s.f_max_iter)
    total = stages * defense.stage_iters
    bound = defense.bound_for(s.f_max_iter)
    lo, hi = defense.clamp
    x0 = x.detach()
    state = {"x": x0.clone(), "c": None, "evals": 0, "last": None}
    with torch.no_grad():
        state["c"] = parts.inject(x0)

    def update_input(z: Tensor) -> None:
        xt = state["x"]
        for _ in range(defense.updates):
            with torch.enable_grad():
                xr = xt.detach().requires_grad_(True)
                h = entropy(parts.readout(parts.cell(z.detach(), parts.inject(xr)))).sum()
                (g,) = torch.autograd.grad(h, xr)
            xt = (x0 + project(xt - defense.step_size * g.sign() - x0, bound, "linf")).clamp(lo, hi).detach()
        state["x"] = xt
        state["c"] = parts.inject(xt)

    def f(z: Tensor) -> Tensor:
        k = state["evals"]
        if k > 0 and k % defense.stage_iters == 0:
            update_input(z)
        state["evals"] = k + 1
        fz = parts.cell(z, state["c"])
        state["last"] = fz
        return fz

    with torch.no_grad():
        solve(f, parts.z0(state["c"]), s.solver, total, s.tol, s.stop_mode, **s.solver_options)
        logits = parts.readout(state["last"])
    return state["x"], logits


def entropy_predictor(
    model: nn.Module, defense: EntropyDefense, deq: Mapping[str, Any] | None = None
) -> Callable[[Tensor], Tensor]:
    """``x ↦ logits`` with entropy-reducing input updates (for ``robust_accuracy(predict=...)``)."""

    def predict(x: Tensor) -> Tensor:
        with TemporaryEvalMode(model):
            return entropy_reduced_inputs(model, x, defense, deq)[1]

    return predict


def entropy_defense_fn(
    model: nn.Module, defense: EntropyDefense, deq: Mapping[str, Any] | None = None
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``x ↦ (final inputs, logits)`` of the defense, the form :func:`fedeq.robust.adaptive.bpda_attack`
    takes."""

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        with TemporaryEvalMode(model):
            return entropy_reduced_inputs(model, x, defense, deq)

    return run
