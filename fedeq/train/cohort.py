"""Local training and evaluation of a cohort: many clients of one tier in one vectorized computation.

:func:`train_cohort` gives every client exactly what :func:`~fedeq.train.local.train_local` gives it
alone: its own shuffles (its own generator and seed), its own number of steps (clients with fewer batches
stop early: their rows are masked out of the computation and out of the optimizer step, moments
included), its own FedProx anchor and ``μ``, its own simulated-deadline stop, and its own statistics. At
step ``t`` the clients still training contribute batch ``t`` (padded to the longest, padding weighted 0);
the loss is ``Σ_c L_c(θ_c)``, so each client's rows of the stacked parameters receive exactly the gradient
of its own loss, and one optimizer step updates all of them (Adam and SGD act elementwise).

What a per-client run would have done with other options (randomized budgets, Jacobian regularization,
adversarial training, outer-problem-aware Broyden updates) is not vectorized: :func:`cohort_problem`
names the reason and the caller trains those clients one by one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.train.cohort_model import StackedModel, cohort_support_problem
from fedeq.train.device import examples_on, parameter_dtype
from fedeq.train.evaluate import EvalStats
from fedeq.train.local import TrainStats
from fedeq.train.optimizers import make_optimizer

Tensor = torch.Tensor

__all__ = ["CohortClient", "cohort_problem", "evaluate_cohort", "train_cohort"]


@dataclass
class CohortClient:
    """One client of a cohort: its training data, starting weights and per-client options."""

    x: Any
    y: Any
    state: Mapping[str, Tensor]
    """The weights it starts from (the model's ``state_dict`` keys)."""
    seed: int
    proximal_mu: float = 0.0
    sim_budget_s: float | None = None


def cohort_problem(
    model: nn.Module,
    *,
    jac_reg: float = 0.0,
    randomize_budget: bool = False,
    adversarial: Any = None,
    deq: Mapping[str, Any] | None = None,
    **_: Any,
) -> str | None:
    """Why clients of ``model`` with these training options cannot train as a cohort, or ``None``."""
    problem = cohort_support_problem(model)
    if problem is not None:
        return problem
    if adversarial is not None:
        return "adversarial training (train.adversarial or train.intermediate_states)"
    if jac_reg > 0:
        return "Jacobian regularization (train.jac_reg > 0)"
    if randomize_budget:
        return "randomized budgets (train.randomize_budget)"
    if (deq or {}).get("reuse_opa_every"):
        return "outer-problem-aware Broyden updates (reuse_opa_every > 0)"
    return None


def _client_batches(x: Tensor, n: int, batch_size: int, epochs: int, seed: int) -> list[Tensor]:
    """The index batches a per-client run draws: one shuffle per epoch from the client's own generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out


def _padded(parts: Sequence[Tensor], length: int) -> Tensor:
    """``parts`` (each ``(n_i, ...)``) zero-padded to ``length`` rows and stacked."""
    out = parts[0].new_zeros((len(parts), length, *parts[0].shape[1:]))
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
    return out


def train_cohort(
    model: nn.Module,
    clients: Sequence[CohortClient],
    *,
    epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 32,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    deq: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    sim_cost_s: float = 0.0,
    **options: Any,
) -> tuple[StackedModel, list[TrainStats]]:
    """Train ``clients`` together (module docstring); returns their stacked weights and, per client, the
    :class:`TrainStats` a per-client run reports. ``compute_s`` / ``compute_cpu_s`` are the cohort's,
    divided evenly among its clients. ``options`` takes the remaining ``train_local`` keywords
    (:func:`cohort_problem` must accept them)."""
    problem = cohort_problem(model, deq=deq, **options)
    if problem is not None:
        raise ValueError(f"cannot train as a cohort: {problem}")
    device = torch.device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    dtype = parameter_dtype(model)
    data = [examples_on(c.x, c.y, device, dtype) for c in clients]
    stacked = StackedModel(model, [c.state for c in clients], device).train()
    params = list(stacked.params.values())
    num = len(clients)
    mu = torch.tensor([float(c.proximal_mu) for c in clients], dtype=dtype, device=device)
    anchor = [p.detach().clone() for p in params] if bool((mu > 0).any()) else None
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    overrides = dict(deq or {})
    plans = [
        _client_batches(x, int(x.shape[0]), batch_size, epochs, c.seed)
        for (x, _), c in zip(data, clients, strict=True)
    ]
    totals = torch.zeros(num, 4, dtype=torch.float64)  # loss, residual, nfe_f, nfe_b (sums over steps)
    steps = [0] * num
    samples = [0] * num
    sim_used = [0.0] * num
    stopped = [False] * num
    for t in range(max((len(p) for p in plans), default=0)):
        active = [c for c in range(num) if not stopped[c] and t < len(plans[c])]
        if not active:
            break
        picks = [plans[c][t] for c in active]
        sizes = torch.tensor([len(p) for p in picks], device=device)
        width = int(sizes.max())
        xb = _padded([data[c][0][p] for c, p in zip(active, picks, strict=True)], width)
        yb = _padded([data[c][1][p] for c, p in zip(active, picks, strict=True)], width)
        valid = torch.arange(width, device=device)[None, :] < sizes[:, None]
        rows = torch.tensor(active, device=device)
        out = stacked.forward(xb, None if len(active) == num else rows, **overrides)
        ce = F.cross_entropy(out.logits.flatten(0, 1), yb.flatten(), reduction="none").view(
            len(active), width
        )
        losses = torch.where(valid, ce, 0).sum(dim=1) / sizes
        total = losses.sum()
        if anchor is not None:
            dist = sum(
                (p[rows] - a[rows]).pow(2).flatten(1).sum(dim=1) for p, a in zip(params, anchor, strict=True)
            )
            total = total + (0.5 * mu[rows] * dist).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        _masked_step(opt, params, rows if len(active) < num else None)
        stats = _step_stats(out, valid)
        stats[:, 0] = losses.detach().to(torch.float64).cpu()
        totals[active] += stats
        for i, c in enumerate(active):
            steps[c] += 1
            samples[c] += int(sizes[i])
            budget = clients[c].sim_budget_s
            if budget is not None:
                sim_used[c] += float(stats[i, 2] + stats[i, 3]) * int(sizes[i]) * sim_cost_s
                stopped[c] = sim_used[c] >= budget
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = (time.perf_counter() - t0) / max(num, 1), (time.process_time() - c0) / max(num, 1)
    result = []
    for c in range(num):
        mean = (totals[c] / max(steps[c], 1)).tolist()
        n = int(data[c][0].shape[0])
        result.append(TrainStats(n, steps[c], mean[0], mean[1], mean[2], mean[3], samples[c], wall, cpu))
    return stacked, result


def _masked_step(opt: torch.optim.Optimizer, params: Sequence[Tensor], rows: Tensor | None) -> None:
    """``opt.step()`` for the client rows ``rows`` only (all when ``None``): the other rows' weights and
    optimizer moments are put back as they were (clients stop for good, so the active ones share the step
    count that Adam's bias correction reads)."""
    if rows is None:
        opt.step()
        return
    keep = torch.ones(params[0].shape[0], dtype=torch.bool, device=params[0].device)
    keep[rows] = False
    saved = []
    for p in params:
        state = {k: v[keep].clone() for k, v in opt.state.get(p, {}).items() if _per_row(v, p)}
        saved.append((p.detach()[keep].clone(), state))
    opt.step()
    with torch.no_grad():
        for p, (weights, state) in zip(params, saved, strict=True):
            p[keep] = weights
            for k, v in state.items():
                opt.state[p][k][keep] = v


def _per_row(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape


def _step_stats(out: Any, valid: Tensor) -> Tensor:
    """Per client row: ``[0, mean residual, forward evaluations, backward VJPs]`` of this step, as a
    per-client call's :func:`~fedeq.train.solver_stats.solver_stats` would report them."""
    rows = valid.shape[0]
    stats = torch.zeros(rows, 4, dtype=torch.float64)
    if out.deq is None:
        return stats
    fs = out.deq.forward
    counts = valid.sum(dim=1).to(torch.float64)
    res = torch.where(valid, fs.rel_residual.view(valid.shape), 0).to(torch.float64).sum(dim=1) / counts
    nfe = torch.where(valid, fs.nfe.view(valid.shape), 0).to(torch.float64).sum(dim=1) / counts
    stats[:, 1] = res.cpu()
    stats[:, 2] = (nfe + out.deq.graph_evals + fs.vjps).cpu()
    bwd = out.deq.backward
    if bwd is not None and bwd.ready:
        stats[:, 3] = bwd.nfe_per_group(valid).to(torch.float64)
    return stats


@torch.no_grad()
def evaluate_cohort(
    stacked: StackedModel,
    data: Sequence[tuple[Any, Any]],
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    **deq_overrides: Any,
) -> list[EvalStats]:
    """Each client's :func:`~fedeq.train.evaluate.evaluate` of its own weights on its own ``(x, y)``."""
    device = torch.device(device)
    stacked.train(False)
    dtype = parameter_dtype(stacked.model)
    sets = [examples_on(x, y, device, dtype) for x, y in data]
    sums = torch.zeros(len(sets), 4, dtype=torch.float64)  # loss, correct, residual, nfe
    longest = max((int(x.shape[0]) for x, _ in sets), default=0)
    for start in range(0, longest, batch_size):
        pieces = [(x[start : start + batch_size], y[start : start + batch_size]) for x, y in sets]
        sizes = torch.tensor([int(x.shape[0]) for x, _ in pieces], device=device)
        width = int(sizes.max())
        xb, yb = _padded([x for x, _ in pieces], width), _padded([y for _, y in pieces], width)
        valid = torch.arange(width, device=device)[None, :] < sizes[:, None]
        out = stacked.forward(xb, **deq_overrides)
        ce = F.cross_entropy(out.logits.flatten(0, 1), yb.flatten(), reduction="none").view(valid.shape)
        hit = (out.logits.argmax(dim=-1) == yb).to(torch.float64)
        sums[:, 0] += torch.where(valid, ce, 0).to(torch.float64).sum(dim=1).cpu()
        sums[:, 1] += torch.where(valid, hit, 0).sum(dim=1).cpu()
        if out.deq is not None:
            fs = out.deq.forward
            for col, value in ((2, fs.rel_residual), (3, fs.nfe + out.deq.graph_evals + fs.vjps)):
                sums[:, col] += (
                    torch.where(valid, value.view(valid.shape), 0).to(torch.float64).sum(dim=1).cpu()
                )
    result = []
    for (x, _), row in zip(sets, sums.tolist(), strict=True):
        n = int(x.shape[0])
        if n == 0:
            result.append(EvalStats(0, float("nan"), float("nan"), float("nan"), float("nan")))
        else:
            result.append(EvalStats(n, row[0] / n, row[1] / n, row[2] / n, row[3] / n))
    return result
