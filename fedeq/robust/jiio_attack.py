"""The JIIO attack: maximise a classifier's cross-entropy over ``B_ε(x₀) ∩ [lo, hi]`` by joint iteration.

The input problem is ``min_{x'} ℓ(z, x') = -Σ_i CE(readout(z_i), y_i)`` with the exact projection onto the
ball intersected with the data range (:func:`~fedeq.robust.ball.project_ball_box`), solved by
:func:`~fedeq.robust.jiio.jiio` with the reference code's per-block damping (0.8 on ``z``, 0.6 on ``λ``) and
step schedule, and returning the last iterate. Step directions: ``sign`` for L∞ (as L∞ PGD), the
L2-normalised gradient for L2 (as the reference code and L2 PGD). The step ``α`` is PGD's (``2.5·ε/steps``
unless ``cfg.step_size``); after ``max(50, ⌊5·steps/8⌋)`` iterations it drops to ``α/3`` (the reference's
MNIST schedule 0.6 → 0.2), which only matters for long runs.

``warm_start`` (default) starts the state and the adjoint from one full forward and adjoint solve at the
start point, with the forward/backward budgets of ``deq`` or the model; ``warm_start=False`` starts from
``z = z_init``, ``λ = 0`` as the reference does. ``cfg.options`` may set ``warm_start``, ``solver``
(``fixed_point`` | ``anderson``, with ``m``, ``lam``, ``beta``), ``select`` (``last`` | ``best``),
``z_damping``, ``lam_damping``, ``late_step`` (relative to ``α``) and ``switch_at``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.models.parts import deq_parts
from fedeq.robust.attacks import AttackConfig, AttackResult
from fedeq.robust.ball import project_ball_box, random_start
from fedeq.robust.input_problem import InputProblem, JIIOResult
from fedeq.robust.jiio import JIIOSchedule, jiio
from fedeq.robust.naive import solve_state_and_adjoint

Tensor = torch.Tensor

__all__ = ["JIIO_OPTIONS", "jiio_attack", "jiio_attack_state"]

JIIO_OPTIONS: tuple[str, ...] = (
    "warm_start",
    "solver",
    "select",
    "z_damping",
    "lam_damping",
    "late_step",
    "switch_at",
    "m",
    "lam",
    "beta",
)
"""The keys ``AttackConfig.options`` may hold for the JIIO attack."""


def jiio_attack_state(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AttackConfig,
    *,
    deq: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[AttackResult, JIIOResult | None]:
    """The attack (module docstring) and the joint state ``(z, λ, x')`` it ended at (``None`` when ε = 0).

    ``λ`` is the adjoint of ``-Σ_i CE_i`` at the returned state: ``-λ/B`` approximates the adjoint of the
    batch-mean cross-entropy that adversarial training differentiates. The loss in the returned
    :class:`AttackResult` is the one of the last evaluated state, one joint update before the returned input
    (no extra evaluation is spent on it); evaluate ``x_adv`` for its exact loss.
    """
    opts = dict(cfg.options)
    unknown = sorted(set(opts) - set(JIIO_OPTIONS))
    if unknown:
        raise ValueError(f"unknown jiio attack option(s) {unknown}; allowed: {', '.join(JIIO_OPTIONS)}")
    parts = deq_parts(model)
    settings = parts.settings.override(**dict(deq or {}))
    x0 = x.detach()
    eps = float(cfg.epsilon)

    def proj(xv: Tensor) -> Tensor:
        return project_ball_box(xv, x0, eps, cfg.norm, cfg.clamp)

    def objective(z: Tensor, _xv: Tensor) -> Tensor:
        return -F.cross_entropy(parts.readout(z), y, reduction="none")

    problem = InputProblem(parts.f, objective, lambda xv: parts.z0(parts.inject(xv)), proj)
    start = proj(x0)
    if cfg.random_start and eps > 0:
        start = proj(x0 + random_start(x0, eps, cfg.norm, generator))
    if eps == 0:
        return AttackResult(start, torch.zeros(x0.shape[0], device=x0.device)), None
    nf = nb = 0
    z0 = lam0 = None
    if bool(opts.pop("warm_start", True)):
        z0, lam0, _, nf, nb = solve_state_and_adjoint(
            problem,
            start,
            solver=settings.solver,
            f_max_iter=settings.f_max_iter,
            b_max_iter=settings.b_max_iter,
            tol=settings.tol,
            stop_mode=settings.stop_mode,
            b_solver=settings.backward_solver,
            b_tol=settings.backward_tol,
        )
    alpha = cfg.alpha
    late = opts.pop("late_step", 1.0 / 3.0)
    schedule = JIIOSchedule(
        z_damping=float(opts.pop("z_damping", 0.8)),
        lam_damping=float(opts.pop("lam_damping", 0.6)),
        direction="sign" if cfg.norm == "linf" else "l2",
        late_step=None if late is None else float(late) * alpha,
        switch_at=opts.pop("switch_at", None),
    )
    res = jiio(
        problem,
        start,
        alpha,
        max_iter=cfg.steps,
        schedule=schedule,
        z0=z0,
        lam0=lam0,
        residuals=False,
        **opts,
    )
    obj = res.objective if res.objective is not None else torch.zeros(x0.shape[0])
    out = AttackResult(res.x.detach(), -obj, nfe_fwd=float(nf + res.f_evals), nfe_bwd=float(nb + res.vjps))
    return out, res


def jiio_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AttackConfig,
    *,
    deq: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Maximise the cross-entropy over ``B_ε(x) ∩ [lo, hi]`` with JIIO (``cfg.kind == "jiio"``; module
    docstring). The reported cost counts the warm-start solve plus one ``f`` and one VJP per iteration."""
    return jiio_attack_state(model, x, y, cfg, deq=deq, generator=generator)[0]
