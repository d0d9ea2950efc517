"""White-box attacks through DEQs: FGSM and PGD in L∞ and L2, and the input gradient they ascend.

For a classifier with loss ``L(x) = ℓ(h(z*(x)), y)`` and ``z* = f(z*, x)``, the attacks ascend ``L`` inside
the ball ``B_ε(x₀) = {x : ||x - x₀||_p ≤ ε}`` intersected with the data range ``[lo, hi]`` (``[0, 1]``):

    L∞ PGD:  δ ← clip_[-ε, ε](δ + α · sign(∇_x L)),
    L2 PGD:  δ ← δ + α · ∇_x L / ||∇_x L||₂,  then  δ ← δ · min(1, ε / ||δ||₂),

followed by ``δ ← clip_[lo, hi](x₀ + δ) - x₀`` (which keeps ``δ`` in the ball for both norms). A random
start draws ``δ`` uniformly from the ball. FGSM is one L∞ step with ``α = ε`` and no random start.

``∇_x L`` through a DEQ depends on the gradient used (``gradient=``):

- ``ift``: the exact implicit gradient ``∇_x L = (∂f/∂x)ᵀ g`` with ``g = J_fᵀ g + ∂ℓ/∂z*``.
- ``phantom``: damped unrolled steps from ``z*`` (the model's phantom settings).
- ``unrolled``: ``K`` undamped steps ``z ← f(z, x)`` from ``z*`` with autograd through all of them
  (``K`` = the forward budget), i.e. the gradient of the unrolled iteration ``Σ_{i<K} J_f^i`` at ``z*``.
- ``jfb``: one step (``g = ∂ℓ/∂z*``); ``None`` keeps the model's (or the call's) backward mode.

Explicit models ignore the DEQ overrides, so every fedeq model can be attacked and evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq.layer import DEQ
from fedeq.models.base import ModelOutput
from fedeq.robust.ball import EPS, NORMS, per_sample, project, random_start

Tensor = torch.Tensor
LossFn = Callable[[ModelOutput, Tensor], Tensor]

__all__ = [
    "ATTACKS",
    "GRADIENTS",
    "NORMS",
    "AttackConfig",
    "AttackResult",
    "LossFn",
    "TemporaryEvalMode",
    "deq_cost",
    "fgsm",
    "forward_budget",
    "gradient_overrides",
    "input_gradient",
    "pgd",
    "run_attack",
]

ATTACKS: tuple[str, ...] = ("pgd", "fgsm", "jiio")
GRADIENTS: tuple[str, ...] = ("ift", "phantom", "unrolled", "jfb")


@dataclass(frozen=True)
class AttackConfig:
    """An attack: kind (``pgd`` | ``fgsm`` | ``jiio``), norm ball and the gradient used through the DEQ.

    ``step_size=None`` means ``2.5·ε/steps`` for PGD and for ``jiio`` (``ε`` for FGSM); for ``jiio``,
    ``steps`` is the number of joint iterations (see :func:`fedeq.robust.jiio_attack.jiio_attack`).
    """

    kind: str = "pgd"
    epsilon: float = 0.1
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    gradient: str | None = "ift"
    clamp: tuple[float, float] = (0.0, 1.0)
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the attack (``jiio``: the keys of
    :data:`fedeq.robust.jiio_attack.JIIO_OPTIONS`)."""

    def validate(self) -> AttackConfig:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack kind must be one of {', '.join(ATTACKS)} (got {self.kind!r})")
        if self.norm not in NORMS:
            raise ValueError(f"attack norm must be one of {', '.join(NORMS)} (got {self.norm!r})")
        if not (isinstance(self.epsilon, int | float) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0 (got {self.epsilon!r})")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"attack steps must be an integer >= 1 (got {self.steps!r})")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"attack step_size must be > 0 or None (got {self.step_size!r})")
        if self.gradient is not None and self.gradient not in GRADIENTS:
            raise ValueError(
                f"attack gradient must be one of {', '.join(GRADIENTS)} or None (got {self.gradient!r})"
            )
        lo, hi = self.clamp
        if not lo < hi:
            raise ValueError(f"clamp must be (lo, hi) with lo < hi (got {self.clamp!r})")
        return self

    @property
    def alpha(self) -> float:
        """The PGD step size (``2.5·ε/steps`` unless set; ``ε`` for FGSM)."""
        if self.step_size is not None:
            return float(self.step_size)
        if self.kind == "fgsm":
            return float(self.epsilon)
        return 2.5 * float(self.epsilon) / self.steps


@dataclass
class AttackResult:
    """Adversarial inputs plus what the attack cost (means per attacked sample)."""

    x_adv: Tensor
    loss: Tensor
    """Per-sample loss at ``x_adv`` (as seen by the attack's last gradient evaluation)."""
    nfe_fwd: float = 0.0
    nfe_bwd: float = 0.0


def forward_budget(model: nn.Module, deq: Mapping[str, Any]) -> int:
    """The forward solver budget of a call with overrides ``deq``: its ``f_max_iter``, else the model's
    (1 for explicit models)."""
    if deq.get("f_max_iter"):
        return int(deq["f_max_iter"])
    layer = getattr(model, "deq", None)
    return layer.settings.f_max_iter if isinstance(layer, DEQ) else 1


def gradient_overrides(
    model: nn.Module, gradient: str | None, deq: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """DEQ call overrides that make ``model`` differentiate with ``gradient`` (merged over ``deq``)."""
    out = dict(deq or {})
    if gradient is None:
        return out
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)} or None (got {gradient!r})")
    if gradient == "unrolled":
        out.update(backward="phantom", phantom_damping=1.0, phantom_steps=forward_budget(model, out))
    else:
        out["backward"] = gradient
    return out


def deq_cost(out: ModelOutput) -> tuple[float, float]:
    """(forward evaluations, backward VJPs) of one model call, means per sample; zeros when explicit."""
    if out.deq is None:
        return 0.0, 0.0
    nfe_f = float(out.deq.forward.nfe.float().mean()) + out.deq.graph_evals
    b = out.deq.backward
    return nfe_f, float(b.nfe) if b is not None and b.ready else 0.0


def _ce(out: ModelOutput, y: Tensor) -> Tensor:
    return F.cross_entropy(out.logits, y, reduction="none")


def input_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    gradient: str | None = "ift",
    deq: Mapping[str, Any] | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """``(∇_x Σ_i ℓ_i, per-sample ℓ, (nfe_fwd, nfe_bwd))`` with the chosen gradient through the DEQ.

    Parameter gradients (``.grad``) are left untouched.
    """
    call = gradient_overrides(model, gradient, deq)
    loss_fn = loss_fn or _ce
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = model(xr, **call)
        losses = loss_fn(out, y)
        (g,) = torch.autograd.grad(losses.sum(), xr)
    return g, losses.detach(), deq_cost(out)


class TemporaryEvalMode:
    """``with TemporaryEvalMode(model):`` runs the block in eval mode (an attack updates no buffers) and
    restores the model's previous mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AttackConfig,
    deq: Mapping[str, Any] | None,
    loss_fn: LossFn | None,
    generator: torch.Generator | None,
    init_delta: Tensor | None,
) -> AttackResult:
    lo, hi = cfg.clamp
    x = x.detach()
    eps, alpha = float(cfg.epsilon), cfg.alpha
    if init_delta is not None:
        delta = project(init_delta.to(x), eps, cfg.norm)
    elif cfg.random_start and cfg.kind == "pgd" and eps > 0:
        delta = random_start(x, eps, cfg.norm, generator)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(lo, hi) - x
    nf = nb = 0.0
    losses = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if eps == 0:
        return AttackResult(x + delta, losses)
    for _ in range(cfg.steps):
        g, losses, (cf, cb) = input_gradient(
            model, x + delta, y, gradient=cfg.gradient, deq=deq, loss_fn=loss_fn
        )
        nf, nb = nf + cf, nb + cb
        if cfg.norm == "linf":
            step = g.sign()
        else:
            step = g / per_sample(g.flatten(1).norm(dim=1).clamp_min(EPS), g)
        delta = project(delta + alpha * step, eps, cfg.norm)
        delta = (x + delta).clamp(lo, hi) - x
    return AttackResult((x + delta).detach(), losses, nf, nb)


def run_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AttackConfig,
    *,
    deq: Mapping[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    init_delta: Tensor | None = None,
) -> AttackResult:
    """Run ``cfg`` on a batch; ``loss_fn(out, y) -> (B,)`` replaces the cross-entropy being maximised.

    The model runs in eval mode during the attack and gets its mode back afterwards. ``init_delta``
    replaces the random start (TRADES starts from a tiny Gaussian perturbation).
    """
    cfg.validate()
    with TemporaryEvalMode(model):
        if cfg.kind == "jiio":
            if loss_fn is not None:
                raise ValueError("the jiio attack maximises the cross-entropy only; loss_fn is not supported")
            from fedeq.robust.jiio_attack import jiio_attack

            return jiio_attack(model, x, y, cfg, deq=deq, generator=generator)
        return _pgd(model, x, y, cfg, deq, loss_fn, generator, init_delta)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    gradient: str | None = "ift",
    deq: Mapping[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    clamp: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the loss in the ε-ball (see the module docstring); returns ``x_adv``."""
    cfg = AttackConfig("pgd", epsilon, norm, steps, step_size, random_start, gradient, clamp)
    return run_attack(model, x, y, cfg, deq=deq, loss_fn=loss_fn, generator=generator).x_adv


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float,
    gradient: str | None = "ift",
    deq: Mapping[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    clamp: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Fast gradient sign method ``x_adv = clip(x + ε·sign(∇_x L))`` (one L∞ PGD step, no random start)."""
    cfg = AttackConfig("fgsm", epsilon, "linf", 1, None, False, gradient, clamp)
    return run_attack(model, x, y, cfg, deq=deq, loss_fn=loss_fn).x_adv
