"""Adversarial training losses and inference-time regulation of the DEQ dynamics.

Training losses (one batch ``(x, y)``, model ``p_θ(·|x) = softmax(h(z*(x)))``):

- PGD-AT (Madry et al.):  ``L = CE(p_θ(x'), y)`` with ``x' = PGD(x)`` maximising the cross-entropy.
- TRADES (Zhang et al.):  ``L = CE(p_θ(x), y) + β · KL(p_θ(x) || p_θ(x'))`` with ``x'`` maximising the KL
  term (started from ``x + 0.001·N(0, I)``).
- Random intermediate states (Yang, Li, Pang, Liu, ICML 2023): the adversarial term is computed at the
  state reached after ``k ~ U{1..K}`` solver evaluations instead of the equilibrium (``K`` = the forward
  budget), so the loss regulates the whole trajectory, not only its end.

The attack runs through the DEQ with the call's own settings (a device tier's solver, budgets and backward
mode) unless ``gradient`` names another one; its function evaluations are reported so the simulated clock
charges adversarial training for its real cost.

Inference (:func:`entropy_reduced_inputs`, Yang et al. Sec. 3.2): the solver runs in ``T`` stages; after
each stage the input is moved ``R`` sign steps down the gradient of the prediction entropy of the current
state, ``x ← clip(x - η · sign(∇_x H(softmax(h(f(z_t, x))))))`` inside ``B_ρ(x₀) ∩ [0, 1]``, and the
dynamics continue from ``z_t`` with the updated input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq.layer import DEQ
from fedeq.deq.solvers import solve
from fedeq.models.base import ModelOutput
from fedeq.models.parts import deq_parts, entropy
from fedeq.robust import NORMS, AttackConfig, TemporaryEvalMode, deq_cost, forward_budget, project, run_attack

Tensor = torch.Tensor

__all__ = [
    "ADVERSARIAL_MODES",
    "AdversarialConfig",
    "AdversarialStep",
    "EntropyDefense",
    "adversarial_from_config",
    "adversarial_step",
    "entropy_predictor",
    "entropy_reduced_inputs",
]

ADVERSARIAL_MODES: tuple[str, ...] = ("none", "pgd", "trades")
"""The local adversarial-training modes ``train.adversarial`` accepts."""


@dataclass(frozen=True)
class AdversarialConfig:
    """A local adversarial-training mode.

    ``mode``: ``pgd`` | ``trades`` | ``none`` (``none`` with ``intermediate_states`` trains on clean inputs
    at random intermediate states). ``attack``: ``pgd`` or ``jiio`` (joint inference and input
    optimization, ``steps`` iterations). ``gradient``: the attack's gradient through the DEQ (``None`` =
    the call's backward mode).
    """

    mode: str = "pgd"
    epsilon: float = 0.1
    steps: int = 5
    step_size: float | None = None
    norm: str = "linf"
    trades_beta: float = 6.0
    intermediate_states: bool = False
    attack: str = "pgd"
    gradient: str | None = None
    random_start: bool = True

    def validate(self) -> AdversarialConfig:
        if self.mode not in ADVERSARIAL_MODES:
            raise ValueError(
                f"adversarial mode must be one of {', '.join(ADVERSARIAL_MODES)} (got {self.mode!r})"
            )
        if self.norm not in NORMS:
            raise ValueError(f"attack norm must be one of {', '.join(NORMS)} (got {self.norm!r})")
        if self.attack not in ("pgd", "jiio"):
            raise ValueError(f"attack must be one of pgd, jiio (got {self.attack!r})")
        if self.mode == "trades" and self.attack != "pgd":
            raise ValueError("trades needs attack 'pgd' (the jiio attack maximises the cross-entropy only)")
        if not self.trades_beta >= 0:
            raise ValueError(f"trades_beta must be >= 0 (got {self.trades_beta!r})")
        self.attack_config().validate()
        return self

    def attack_config(self) -> AttackConfig:
        """The inner maximisation as an :class:`~fedeq.robust.AttackConfig`."""
        return AttackConfig(
            kind=self.attack,
            epsilon=float(self.epsilon),
            norm=self.norm,
            steps=int(self.steps),
            step_size=self.step_size,
            random_start=self.random_start,
            gradient=self.gradient,
        )


def adversarial_from_config(train: Any) -> AdversarialConfig | None:
    """The adversarial mode of a ``train`` config section (``None`` for plain training)."""
    mode = str(getattr(train, "adversarial", "none"))
    inter = bool(getattr(train, "intermediate_states", False))
    if mode == "none" and not inter:
        return None
    step = getattr(train, "attack_step_size", None)
    return AdversarialConfig(
        mode=mode,
        epsilon=float(train.epsilon),
        steps=int(train.attack_steps),
        step_size=None if step is None else float(step),
        norm=str(train.attack_norm),
        trades_beta=float(train.trades_beta),
        intermediate_states=inter,
    ).validate()


@dataclass
class AdversarialStep:
    """The training loss of one batch, the model output it was computed from, and the attack's cost."""

    loss: Tensor
    out: ModelOutput
    nfe_fwd: float
    """Function evaluations per sample spent by the attack (and any extra forward passes)."""
    nfe_bwd: float


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-sample ``KL(p || q)`` from logits (``p`` treated as a constant target)."""
    logp = torch.log_softmax(p_logits, dim=1)
    logq = torch.log_softmax(q_logits, dim=1)
    return (logp.exp() * (logp - logq)).sum(dim=1)


def adversarial_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AdversarialConfig,
    deq: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> AdversarialStep:
    """The adversarial loss of one batch (module docstring); call ``.backward()`` on ``loss``.

    ``deq`` holds the call's DEQ overrides (a tier's budgets); with ``intermediate_states`` the robust
    term uses ``f_max_iter = k`` with ``k`` drawn from ``generator``.
    """
    call = dict(deq or {})
    attack_call = {k: v for k, v in call.items() if k != "jac_reg_samples"}
    acfg = cfg.attack_config()
    k_call = call
    if cfg.intermediate_states:
        k_max = forward_budget(model, call)
        if k_max > 1 and isinstance(getattr(model, "deq", None), DEQ):
            k = int(torch.randint(1, k_max + 1, (1,), generator=generator))
            k_call = {**call, "f_max_iter": k}
    extra_f = extra_b = 0.0
    if cfg.mode == "trades":
        out_clean = model(x, **call)
        target = out_clean.logits.detach()
        init = 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

        def kl_loss(o: ModelOutput, _y: Tensor) -> Tensor:
            return _kl(target, o.logits)

        res = run_attack(
            model, x, y, acfg, deq=attack_call, loss_fn=kl_loss, generator=generator, init_delta=init
        )
        out_adv = model(res.x_adv, **k_call)
        loss = (
            F.cross_entropy(out_clean.logits, y)
            + cfg.trades_beta * _kl(out_clean.logits, out_adv.logits).mean()
        )
        extra_f = deq_cost(out_adv)[0]
        return AdversarialStep(loss, out_clean, res.nfe_fwd + extra_f, res.nfe_bwd)
    if cfg.mode == "pgd":
        res = run_attack(model, x, y, acfg, deq=attack_call, generator=generator)
        x_in, extra_f, extra_b = res.x_adv, res.nfe_fwd, res.nfe_bwd
    else:
        x_in = x
    out = model(x_in, **k_call)
    return AdversarialStep(F.cross_entropy(out.logits, y), out, extra_f, extra_b)


@dataclass(frozen=True)
class EntropyDefense:
    """Entropy-reducing input updates along the dynamics (inference only).

    ``stages`` solver stages of ``stage_iters`` evaluations each (default: the forward budget split evenly);
    after each stage ``updates`` sign steps of size ``step_size`` on the input, kept within ``radius``
    (L∞; ``None``: ``stages·updates·step_size``) of the given input and inside ``clamp``. A final solve
    of ``final_iters`` evaluations (default: the forward budget) from the last state gives the prediction.
    """

    stages: int = 3
    updates: int = 10
    step_size: float = 0.01
    radius: float | None = 0.1
    stage_iters: int | None = None
    final_iters: int | None = None
    clamp: tuple[float, float] = (0.0, 1.0)

    @property
    def bound(self) -> float:
        return self.radius if self.radius is not None else self.stages * self.updates * self.step_size


def entropy_reduced_inputs(
    model: nn.Module,
    x: Tensor,
    defense: EntropyDefense,
    deq: Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(updated inputs, final logits)`` of the entropy-reducing input updates (module docstring)."""
    parts = deq_parts(model)
    s = parts.settings.override(**dict(deq or {}))
    solver, tol, stop_mode, opts = s.solver, s.tol, s.stop_mode, dict(s.solver_options)
    stage_iters = defense.stage_iters or max(1, s.f_max_iter // max(defense.stages, 1))
    final_iters = defense.final_iters or s.f_max_iter
    lo, hi = defense.clamp
    x0 = x.detach()
    xt = x0.clone()
    with torch.no_grad():
        z = parts.z0(parts.inject(xt))
    for _ in range(defense.stages):
        with torch.no_grad():
            ctx = parts.inject(xt)
            z, _ = solve(lambda v, c=ctx: parts.cell(v, c), z, solver, stage_iters, tol, stop_mode, **opts)
        for _ in range(defense.updates):
            with torch.enable_grad():
                xr = xt.detach().requires_grad_(True)
                h = entropy(parts.readout(parts.cell(z, parts.inject(xr)))).sum()
                (g,) = torch.autograd.grad(h, xr)
            xt = x0 + project(xt - defense.step_size * g.sign() - x0, defense.bound, "linf")
            xt = xt.clamp(lo, hi).detach()
    with torch.no_grad():
        ctx = parts.inject(xt)
        z, _ = solve(lambda v: parts.cell(v, ctx), z, solver, final_iters, tol, stop_mode, **opts)
        logits = parts.readout(z)
    return xt, logits


def entropy_predictor(
    model: nn.Module, defense: EntropyDefense, deq: Mapping[str, Any] | None = None
) -> Callable[[Tensor], Tensor]:
    """``x ↦ logits`` with entropy-reducing input updates (for ``robust_accuracy(predict=...)``)."""

    def predict(x: Tensor) -> Tensor:
        with TemporaryEvalMode(model):
            return entropy_reduced_inputs(model, x, defense, deq)[1]

    return predict
