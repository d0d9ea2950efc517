"""Local training under a solver budget: cross-entropy or an adversarial loss, Jacobian and FedProx terms."""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedeq.data import batches
from fedeq.deq.layer import DEQ, DEQSettings
from fedeq.train.adversarial import AdversarialConfig, adversarial_step
from fedeq.train.device import examples_on, move_to, parameter_dtype, seed_global_rng
from fedeq.train.optimizers import make_optimizer
from fedeq.train.solver_stats import solver_stats

Tensor = torch.Tensor


@dataclass
class TrainStats:
    """What one local training run reports (means are per optimisation step)."""

    num_examples: int
    steps: int
    loss: float
    fp_residual: float
    """Mean relative fixed-point residual the forward solves reached (0 for explicit models)."""
    nfe_fwd: float
    """Mean function evaluations per forward pass (solver + evaluations with autograd + the VJPs of
    outer-problem-aware updates)."""
    nfe_bwd: float
    """Mean vector-Jacobian products per backward pass spent on the fixed point."""
    samples_processed: int
    compute_s: float
    """Wall-clock seconds of the training loop."""
    compute_cpu_s: float
    """CPU seconds this process spent in the training loop (all its threads)."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _default_budget(model: nn.Module) -> int:
    """The forward budget of ``model``'s DEQ (1 for explicit models)."""
    layer = getattr(model, "deq", None)
    return layer.settings.f_max_iter if isinstance(layer, DEQ) else 1


def wants_targets(model: nn.Module, overrides: Mapping[str, Any]) -> bool:
    """Whether a training call of ``model`` with DEQ ``overrides`` makes outer-problem-aware updates
    (``reuse_opa_every > 0`` with ``backward="broyden_reuse"``), so that the model must receive the
    targets; ``ValueError`` when the model's ``forward`` takes no ``targets`` keyword."""
    base = next(
        (s for m in model.modules() if isinstance(s := vars(m).get("settings"), DEQSettings)), DEQSettings()
    )
    every, backward = (
        getattr(base, k) if overrides.get(k) is None else overrides[k]
        for k in ("reuse_opa_every", "backward")
    )
    if not every or backward != "broyden_reuse":
        return False
    if "targets" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"reuse_opa_every={every} needs the loss gradient during the forward solve, from a model whose "
            f"forward takes targets= (a DEQClassifier such as mlp_deq or conv_deq); "
            f"{type(model).__name__} does not"
        )
    return True


def squared_distance(params: Sequence[Tensor], anchor: Sequence[Tensor]) -> Tensor:
    """``||θ - θ_anchor||²`` over all parameters (the FedProx term without its ``μ/2``)."""
    return sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))


def train_local(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 32,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    deq: Mapping[str, Any] | None = None,
    jac_reg: float = 0.0,
    jac_reg_samples: int = 1,
    randomize_budget: bool = False,
    proximal_mu: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    adversarial: AdversarialConfig | None = None,
    sim_budget_s: float | None = None,
    sim_cost_s: float = 0.0,
    penalty: Callable[[Sequence[Tensor]], Tensor] | None = None,
) -> TrainStats:
    """Train ``model`` in place with cross-entropy (+ ``jac_reg``·Jacobian term + FedProx term).

    ``deq`` holds per-call DEQ overrides (``f_max_iter``, ``b_max_iter``, ``solver``, ``backward``, ...).
    With ``randomize_budget`` each step draws its forward budget uniformly from ``1..f_max_iter``, which
    trains the model to be accurate at every budget (anytime). FedProx adds ``μ/2 ||θ - θ_global||²`` with
    ``θ_global`` the weights at entry. ``adversarial`` (an
    :class:`~fedeq.train.adversarial.AdversarialConfig`) swaps the cross-entropy for PGD-AT / TRADES /
    random-intermediate-state losses; the attack's function evaluations are added to ``nfe_fwd`` /
    ``nfe_bwd``. ``penalty(params)`` adds a term of the trained parameters (those with
    ``requires_grad``, in ``model.parameters()`` order) to every step's loss, e.g. an ADMM or Ditto term.
    With ``sim_budget_s`` training stops once the simulated compute
    ``Σ_steps (nfe_fwd + nfe_bwd)·batch·sim_cost_s`` reaches it (a device's deadline).
    """
    if adversarial is not None:
        adversarial.validate()
    device = torch.device(device)
    move_to(model, device).train()
    xt, yt = examples_on(x, y, device, parameter_dtype(model))
    overrides = dict(deq or {})
    if jac_reg > 0:
        overrides["jac_reg_samples"] = jac_reg_samples
    gen = torch.Generator().manual_seed(seed)
    seed_global_rng(seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    f_budget = overrides.get("f_max_iter") or _default_budget(model)
    opa = wants_targets(model, overrides)
    if opa and adversarial is not None:
        raise ValueError("reuse_opa_every is not supported with adversarial training (adversarial=...)")
    t0, c0 = time.perf_counter(), time.process_time()
    totals = np.zeros(4)  # loss, residual, nfe_f, nfe_b
    steps = samples = 0
    sim_used = 0.0
    # One pass over every epoch's batches; each epoch's shuffle is drawn when that epoch begins.
    epoch_batches = (batches(xt, yt, batch_size, shuffle=True, generator=gen) for _ in range(epochs))
    for xb, yb in itertools.chain.from_iterable(epoch_batches):
        call = overrides
        if randomize_budget and f_budget > 1:
            call = {**overrides, "f_max_iter": int(torch.randint(1, f_budget + 1, (1,), generator=gen))}
        if adversarial is None:
            out = model(xb, targets=yb, **call) if opa else model(xb, **call)
            loss = F.cross_entropy(out.logits, yb)
        else:
            adv = adversarial_step(model, xb, yb, adversarial, call, generator=gen)
            out, loss = adv.out, adv.loss
        total = loss
        if jac_reg > 0 and out.aux_loss is not None:
            total = total + jac_reg * out.aux_loss
        if anchor is not None:
            total = total + 0.5 * proximal_mu * squared_distance(params, anchor)
        if penalty is not None:
            total = total + penalty(params)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        res, nf, nb = solver_stats(out)
        if adversarial is not None:
            nf, nb = nf + adv.nfe_fwd, nb + adv.nfe_bwd
        totals += (float(loss.detach()), res, nf, nb)
        steps += 1
        samples += xb.shape[0]
        sim_used += (nf + nb) * xb.shape[0] * sim_cost_s
        if sim_budget_s is not None and sim_used >= sim_budget_s:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mean = totals / max(steps, 1)
    return TrainStats(
        num_examples=int(xt.shape[0]),
        steps=steps,
        loss=float(mean[0]),
        fp_residual=float(mean[1]),
        nfe_fwd=float(mean[2]),
        nfe_bwd=float(mean[3]),
        samples_processed=samples,
        compute_s=time.perf_counter() - t0,
        compute_cpu_s=time.process_time() - c0,
    )
