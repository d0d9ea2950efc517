"""JIIO adversarial training: the training loss of one batch at the state JIIO ends at, with the parameter
backward warm-started from JIIO's adjoint (as the reference code does).

1. :func:`~fedeq.robust.jiio_attack.jiio_attack_state` (model in eval mode) returns ``x'`` and the joint
   state ``(z, λ)``, where ``λ`` is the adjoint of ``-Σ_i CE_i``.
2. In the model's own mode: ``z⁺ = f(z, x')`` once with a graph, ``L = mean_i CE(readout(z⁺), y_i)``; no new
   forward solve.
3. The gradient reaching ``z⁺`` (``w = ∂L/∂z⁺``) becomes the adjoint ``g = J_zᵀ g + w``, solved with the
   backward solver, budget and tolerance of the call, started from ``-λ/B`` (the adjoint of the batch-mean
   cross-entropy once JIIO has converged) instead of from ``w``; then ``∂L/∂θ = (∂f/∂θ)ᵀ g``.

The reference solves step 3 with Broyden from ``-λ/B``; here the call's backward solver runs from that
start (it stops as soon as the residual reaches the tolerance, so a good start saves VJPs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq.backward import BackwardStats
from fedeq.deq.layer import DEQOutput
from fedeq.deq.solvers import SolverStats, solve
from fedeq.models.base import ModelOutput
from fedeq.models.parts import deq_parts
from fedeq.robust.attacks import AttackConfig, TemporaryEvalMode
from fedeq.robust.input_problem import rel_norm
from fedeq.robust.jiio_attack import jiio_attack_state

Tensor = torch.Tensor

__all__ = ["jiio_adversarial_loss"]


def _adjoint_hook(
    z_in: Tensor, fz: Tensor, g0: Tensor | None, settings: Any, stats: BackwardStats
) -> Callable[[Tensor], Tensor]:
    """The gradient hook of ``fz``: ``w ↦ g`` with ``g = J_zᵀ g + w`` solved from ``g0`` (``None``: ``w``)."""
    busy = [False]

    def hook(w: Tensor) -> Tensor:
        if busy[0]:  # the vector-Jacobian products below start at fz: leave their gradient alone
            return w
        busy[0] = True
        try:

            def adjoint(g: Tensor) -> Tensor:
                return torch.autograd.grad(fz, z_in, g, retain_graph=True)[0] + w

            g, st = solve(
                adjoint,
                w if g0 is None else g0,
                settings.backward_solver,
                settings.b_max_iter,
                settings.backward_tol,
                settings.stop_mode,
                **settings.b_solver_options,
            )
            stats.nfe = int(st.nfe.max())
            stats.abs_residual, stats.rel_residual = st.abs_residual, st.rel_residual
            stats.ready = True
            return g
        finally:
            busy[0] = False

    return hook


def jiio_adversarial_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: AttackConfig,
    deq: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    warm_backward: bool = True,
) -> tuple[Tensor, ModelOutput, float, float]:
    """``(loss, output, attack f-evals, attack VJPs)`` of one JIIO-AT batch (module docstring).

    ``output.deq`` reports one graph evaluation of ``f`` and, once ``loss.backward()`` has run, the VJPs of
    the parameter backward; the attack's own cost is returned separately (per sample, as for PGD).
    ``warm_backward=False`` starts the adjoint from ``w`` (plain implicit differentiation at JIIO's state).
    """
    cfg = AttackConfig(**{**cfg.__dict__, "kind": "jiio"}).validate()
    with TemporaryEvalMode(model):
        atk, state = jiio_attack_state(model, x, y, cfg, deq=deq, generator=generator)
    if state is None:  # ε = 0: plain training on the clean batch
        out = model(atk.x_adv, **dict(deq or {}))
        return F.cross_entropy(out.logits, y), out, 0.0, 0.0
    parts = deq_parts(model)
    settings = parts.settings.override(**dict(deq or {}))
    z_in = state.z.detach().requires_grad_(True)
    fz = parts.cell(z_in, parts.inject(atk.x_adv))
    logits = parts.readout(fz)
    bstats = BackwardStats(mode="jiio_warm" if warm_backward else "ift")
    if fz.requires_grad:
        g0 = -state.lam.detach() / x.shape[0] if warm_backward else None
        fz.register_hook(_adjoint_hook(z_in, fz, g0, settings, bstats))
    with torch.no_grad():
        abs_res = (fz - z_in).flatten(1).norm(dim=1)
        rel_res = rel_norm(fz - z_in, fz)
    zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    fstats = SolverStats(zeros, abs_res, rel_res, abs_res <= settings.tol, zeros.bool())
    out = ModelOutput(logits, DEQOutput(fz, fstats, bstats, settings, graph_evals=1))
    return F.cross_entropy(logits, y), out, atk.nfe_fwd, atk.nfe_bwd
