"""An adaptive attack on an input-purifying defense: PGD with BPDA (Athalye, Carlini, Wagner, ICML 2018).

A defense ``D(x) = (x', logits)`` first moves the input (``x' = P(x)``, e.g. the entropy-reducing input
updates of :mod:`fedeq.train.entropy_defense`) and then predicts. ``P`` is built from sign steps, whose
gradient is zero almost everywhere, so PGD through it sees no signal. Backward Pass Differentiable
Approximation replaces ``∂P/∂x`` by the identity: the attack's gradient is the model's input gradient at
the purified point,

    g = ∇_{x'} ℓ(h(z*(x')), y) |_{x' = P(x)},      x ← Proj_{B_ε(x₀) ∩ [lo, hi]}(x + α · sign(g)),

with the chosen gradient through the DEQ (``cfg.gradient``). The defense is deterministic, so no
expectation over transformations (EOT) is needed. Every iterate is scored through the whole defense, and
per sample the iterate with the largest defended loss is returned (a defended misclassification is
never lost by a later step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.robust.attacks import AttackConfig, AttackResult, TemporaryEvalMode, input_gradient
from fedeq.robust.ball import EPS, per_sample, project, random_start

Tensor = torch.Tensor
Defense = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``x ↦ (purified input, logits)``."""

__all__ = ["Defense", "bpda_attack"]


def bpda_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    defense: Defense,
    cfg: AttackConfig,
    *,
    deq: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
) -> AttackResult:
    """PGD with the BPDA gradient through ``defense`` (module docstring); ``cfg.kind`` must be ``pgd`` or
    ``fgsm``. ``init`` (e.g. a non-adaptive attack's output) replaces the random start, so the result is
    never weaker than it. ``loss`` of the result is the defended cross-entropy of the returned inputs."""
    cfg.validate()
    if cfg.kind not in ("pgd", "fgsm"):
        raise ValueError(f"bpda_attack runs pgd or fgsm (got {cfg.kind!r})")
    lo, hi = cfg.clamp
    x = x.detach()
    eps, alpha = float(cfg.epsilon), cfg.alpha
    if init is not None:
        delta = project(init.detach().to(x) - x, eps, cfg.norm)
    elif cfg.random_start and cfg.kind == "pgd" and eps > 0:
        delta = random_start(x, eps, cfg.norm, generator)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(lo, hi) - x
    best_x = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), dtype=x.dtype, device=x.device)
    nf = nb = 0.0
    with TemporaryEvalMode(model):
        for step in range(cfg.steps + 1):
            x_cur = x + delta
            with torch.no_grad():
                x_pur, logits = defense(x_cur)
                loss = F.cross_entropy(logits, y, reduction="none")
            better = loss > best_loss
            best_x[better] = x_cur[better]
            best_loss = torch.where(better, loss, best_loss)
            if step == cfg.steps or eps == 0:
                break
            g, _, (cf, cb) = input_gradient(model, x_pur, y, gradient=cfg.gradient, deq=deq)
            nf, nb = nf + cf, nb + cb
            if cfg.norm == "linf":
                direction = g.sign()
            else:
                direction = g / per_sample(g.flatten(1).norm(dim=1).clamp_min(EPS), g)
            delta = project(delta + alpha * direction, eps, cfg.norm)
            delta = (x + delta).clamp(lo, hi) - x
    return AttackResult(best_x.detach(), best_loss, nf, nb)
