"""Adversarial training losses and inference-time regulation of the DEQ dynamics.

Training losses (one batch ``(x, y)``, model ``p_θ(·|x) = softmax(h(z*(x)))``):

- PGD-AT (Madry et al.):  ``L = CE(p_θ(x'), y)`` with ``x' = PGD(x)`` maximising the cross-entropy.
- TRADES (Zhang et al.):  ``L = CE(p_θ(x), y) + β · KL(p_θ(x) || p_θ(x'))`` with ``x'`` maximising the KL
  term (started from ``x + 0.001·N(0, I)``).
- Random intermediate states (Yang, Pang, Chen, Lin, ICML 2023): every forward of the step (clean term,
  each PGD step, adversarial term) uses the state after its own ``k ~ U{1..K}`` solver evaluations with the
  reference's unrolled gradient (:mod:`fedeq.train.intermediate`), so the loss regulates the whole
  trajectory, not only its end.

The attack runs through the DEQ with the call's own settings (a device tier's solver, budgets and backward
mode) unless ``gradient`` names another one; its function evaluations are reported so the simulated clock
charges adversarial training for its real cost.

The inference-time defense of the same paper (entropy-reducing input updates) is in
:mod:`fedeq.train.entropy_defense`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.models.base import ModelOutput
from fedeq.robust import NORMS, AttackConfig, deq_cost, jiio_adversarial_loss, run_attack
from fedeq.train.intermediate import RandomIntermediate

Tensor = torch.Tensor

__all__ = [
    "ADVERSARIAL_MODES",
    "AdversarialConfig",
    "AdversarialStep",
    "adversarial_from_config",
    "adversarial_step",
]

ADVERSARIAL_MODES: tuple[str, ...] = ("none", "pgd", "trades")
"""The local adversarial-training modes ``train.adversarial`` accepts."""


@dataclass(frozen=True)
class AdversarialConfig:
    """A local adversarial-training mode.

    ``mode``: ``pgd`` | ``trades`` | ``none`` (``none`` with ``intermediate_states`` trains on clean inputs
    at random intermediate states). ``attack``: ``pgd`` or ``jiio`` (joint inference and input
    optimization, ``steps`` iterations; PGD-AT with it trains at JIIO's own state with the parameter
    backward warm-started from its adjoint, :func:`fedeq.robust.jiio_adversarial_loss`). ``gradient``: the
    attack's gradient through the DEQ (``None`` = the call's backward mode).
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

    ``deq`` holds the call's DEQ overrides (a tier's budgets); with ``intermediate_states`` every forward
    (clean term, PGD steps, adversarial term) runs :class:`~fedeq.train.intermediate.RandomIntermediate`
    with its own ``k`` drawn from ``generator``.
    """
    call = dict(deq or {})
    attack_call = {k: v for k, v in call.items() if k != "jac_reg_samples"}
    acfg = cfg.attack_config()
    # Random intermediate states: every forward (clean term, each PGD step, adversarial term) draws its own k.
    net = RandomIntermediate(model, generator) if cfg.intermediate_states else model
    attacked = net if acfg.kind == "pgd" else model
    extra_f = extra_b = 0.0
    if cfg.mode == "trades":
        out_clean = net(x, **call)
        target = out_clean.logits.detach()
        init = 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

        def kl_loss(o: ModelOutput, _y: Tensor) -> Tensor:
            return _kl(target, o.logits)

        res = run_attack(
            attacked, x, y, acfg, deq=attack_call, loss_fn=kl_loss, generator=generator, init_delta=init
        )
        out_adv = net(res.x_adv, **call)
        loss = (
            F.cross_entropy(out_clean.logits, y)
            + cfg.trades_beta * _kl(out_clean.logits, out_adv.logits).mean()
        )
        extra_f, extra_b = deq_cost(out_adv)
        return AdversarialStep(loss, out_clean, res.nfe_fwd + extra_f, res.nfe_bwd + extra_b)
    if cfg.mode == "pgd" and acfg.kind == "jiio" and not cfg.intermediate_states:
        # JIIO-AT: the loss at JIIO's own state, parameter backward warm-started from its adjoint
        loss, out, nf, nb = jiio_adversarial_loss(model, x, y, acfg, deq=attack_call, generator=generator)
        return AdversarialStep(loss, out, nf, nb)
    if cfg.mode == "pgd":
        res = run_attack(attacked, x, y, acfg, deq=attack_call, generator=generator)
        x_in, extra_f, extra_b = res.x_adv, res.nfe_fwd, res.nfe_bwd
    else:
        x_in = x
    out = net(x_in, **call)
    return AdversarialStep(F.cross_entropy(out.logits, y), out, extra_f, extra_b)
