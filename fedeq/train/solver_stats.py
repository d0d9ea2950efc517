"""What one model call cost its DEQ: the residual reached and the function evaluations spent."""

from __future__ import annotations

from fedeq.models.base import ModelOutput


def solver_stats(out: ModelOutput) -> tuple[float, float, float]:
    """(mean relative residual, forward evaluations, backward VJPs) of one call; zeros for explicit models.

    Forward evaluations count the solver's (mean per sample) plus the evaluations run with autograd and
    the VJPs of the solve's outer-problem-aware updates (``reuse_opa_every``); backward VJPs are those
    spent on the fixed point once the backward pass has run.
    """
    if out.deq is None:
        return 0.0, 0.0, 0.0
    fs = out.deq.forward
    res = float(fs.rel_residual.mean())
    nfe_f = float(fs.nfe.float().mean()) + out.deq.graph_evals + fs.vjps
    bwd = out.deq.backward
    nfe_b = float(bwd.nfe) if bwd is not None and bwd.ready else 0.0
    return res, nfe_f, nfe_b
