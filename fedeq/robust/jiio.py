"""Joint inference and input optimization (JIIO; Gurumurthy, Bai, Manchester, Kolter, NeurIPS 2021).

For the input problem of :mod:`fedeq.robust.input_problem`, JIIO iterates one map on the joint state
``s = (z, λ, x)`` instead of nesting a forward solve, an adjoint solve and a gradient step. With all terms
evaluated at the current ``(z, λ, x)`` (one ``f`` evaluation and one vector-Jacobian product):

    z ← z + β_z (f(z, x) - z)                       (β_z = 0.8)
    λ ← λ + β_λ (J_zᵀλ + ∂ℓ/∂z - λ)                  (β_λ = 0.6)
    x ← Proj_C(x - α_k d(∂ℓ/∂x + J_xᵀλ))

``d`` is the plain gradient (``gradient``), the gradient over its L2 norm (``l2``, the reference code's step
for adversarial perturbations) or its sign (``sign``, the steepest-descent direction of the L∞ norm). The
step follows the reference schedule: ``α_k = α`` for the first ``switch_at`` iterations, then
``late_step`` (the reference switches at ``max(50, ⌊5 K / 8⌋)`` of ``K`` iterations). Its fixed points are the
points satisfying the three first-order conditions (the damping only scales the updates).

``solver="anderson"`` applies Anderson acceleration (memory ``m``, ridge ``lam``, mixing ``beta``) to the
damped map, as the reference does; ``fixed_point`` iterates it plainly. The answer is the **last** state
(``select="last"``), or the reference's choice among the evaluated states (``select="best"``): every state
of the first 10 iterations is accepted, afterwards a state whose residual ``||T(s) - s||`` is the lowest so
far, or whose objective is lower than the accepted one's at a residual within 1.3× the lowest. Never the
lowest-residual state alone: a state that stopped moving is not a better input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedeq.robust.input_problem import InputProblem, JIIOResult, bview, evaluate, stationarity

Tensor = torch.Tensor

__all__ = ["DIRECTIONS", "SELECTIONS", "SOLVERS", "JIIOSchedule", "jiio"]

DIRECTIONS: tuple[str, ...] = ("gradient", "l2", "sign")
SELECTIONS: tuple[str, ...] = ("last", "best")
SOLVERS: tuple[str, ...] = ("fixed_point", "anderson")
_EPS = 1e-12


@dataclass(frozen=True)
class JIIOSchedule:
    """Damping per block, step direction and step-size schedule of the joint map (module docstring).

    ``late_step=None`` keeps ``α`` throughout; ``switch_at=None`` means ``max(50, ⌊5·max_iter/8⌋)``.
    """

    z_damping: float = 0.8
    lam_damping: float = 0.6
    direction: str = "gradient"
    late_step: Tensor | float | None = None
    switch_at: int | None = None

    def validate(self) -> JIIOSchedule:
        for name in ("z_damping", "lam_damping"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1] (got {v!r})")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)} (got {self.direction!r})")
        if self.switch_at is not None and self.switch_at < 0:
            raise ValueError(f"switch_at must be >= 0 or None (got {self.switch_at!r})")
        return self

    def switch(self, max_iter: int) -> int:
        return self.switch_at if self.switch_at is not None else max(50, (5 * max_iter) // 8)


def _direction(g: Tensor, kind: str) -> Tensor:
    if kind == "sign":
        return g.sign()
    if kind == "l2":
        return g / bview(g.flatten(1).norm(dim=1).clamp_min(_EPS), g)
    return g


def _stack(z: Tensor, lam: Tensor, x: Tensor) -> Tensor:
    b = x.shape[0]
    return torch.cat([z.reshape(b, -1), lam.reshape(b, -1), x.reshape(b, -1)], dim=1)


def _split(s: Tensor, z_shape: torch.Size, x_shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
    dz = int(torch.Size(z_shape[1:]).numel())
    return s[:, :dz].reshape(z_shape), s[:, dz : 2 * dz].reshape(z_shape), s[:, 2 * dz :].reshape(x_shape)


class _Anderson:
    """Batched Anderson mixing: ``s ← β Σ a_i F_i + (1 - β) Σ a_i X_i`` with ``a`` minimising
    ``||Σ a_i (F_i - X_i)||² + lam ||a||²`` subject to ``Σ a_i = 1`` over the last ``m`` pairs."""

    def __init__(self, m: int, lam: float, beta: float) -> None:
        if m < 1:
            raise ValueError(f"anderson memory m must be >= 1 (got {m!r})")
        self.m, self.lam, self.beta = m, lam, beta
        self.xs: list[Tensor] = []
        self.fs: list[Tensor] = []

    def __call__(self, x: Tensor, fx: Tensor) -> Tensor:
        self.xs = [*self.xs, x][-self.m :]
        self.fs = [*self.fs, fx][-self.m :]
        X, Fv = torch.stack(self.xs, 1), torch.stack(self.fs, 1)  # (B, n, d)
        G = (Fv - X).double()
        n = G.shape[1]
        H = G @ G.transpose(1, 2) + self.lam * torch.eye(n, dtype=G.dtype, device=G.device)
        a = torch.linalg.solve(H, torch.ones(G.shape[0], n, 1, dtype=G.dtype, device=G.device))
        a = (a / a.sum(dim=1, keepdim=True)).to(x.dtype)  # (B, n, 1)
        return self.beta * (a * Fv).sum(1) + (1 - self.beta) * (a * X).sum(1)


def jiio(
    problem: InputProblem,
    x0: Tensor,
    step_size: Tensor | float,
    *,
    max_iter: int = 200,
    tol: float = 0.0,
    stop_mode: str = "abs",
    solver: str = "fixed_point",
    schedule: JIIOSchedule | None = None,
    select: str = "last",
    z0: Tensor | None = None,
    lam0: Tensor | None = None,
    record: bool = False,
    residuals: bool = True,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> JIIOResult:
    """Solve the input problem with the joint iteration (module docstring) from ``(z0, λ0, Proj(x0))``.

    ``step_size`` is ``α`` (a float or one value per sample); ``max_iter`` counts joint updates (one ``f``
    and one VJP each). The loop stops early once every sample's ``||T(s) - s||`` (``stop_mode`` ``abs``
    or ``rel``) is at most ``tol``. ``residuals=False`` skips the final check of the three conditions
    (which costs one more ``f`` and VJP, not counted in ``f_evals``).
    """
    sched = (schedule or JIIOSchedule()).validate()
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} (got {solver!r})")
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {', '.join(SELECTIONS)} (got {select!r})")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be one of abs, rel (got {stop_mode!r})")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1 (got {max_iter!r})")
    t0 = time.perf_counter()
    x = problem.proj(x0.detach())
    z = problem.initial_state(x) if z0 is None else z0.detach()
    lam_ = torch.zeros_like(z) if lam0 is None else lam0.detach()
    shapes = (z.shape, x.shape)
    mixer = _Anderson(m, lam, beta) if solver == "anderson" else None
    history: list[tuple[float, int, Tensor]] | None = [] if record else None
    best: list[Tensor] | None = None
    best_res = best_obj = torch.zeros(0)
    switch = sched.switch(max_iter)
    obj = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    k = 0
    while k < max_iter:
        alpha = step_size if (k < switch or sched.late_step is None) else sched.late_step
        ev = evaluate(problem, z, lam_, x)
        obj = ev.objective
        z_new = z + sched.z_damping * (ev.fz - z)
        l_new = lam_ + sched.lam_damping * (ev.lam - lam_)
        x_new = problem.proj(x - bview(alpha, x) * _direction(ev.grad_x, sched.direction)).detach()
        s, fs = _stack(z, lam_, x), _stack(z_new, l_new, x_new)
        res = (fs - s).norm(dim=1)
        if stop_mode == "rel":
            res = res / (fs.norm(dim=1) + _EPS)
        if select == "best":
            best, best_res, best_obj = _accept(k, best, best_res, best_obj, (z, lam_, x), res, obj)
        k += 1
        nxt = fs if mixer is None else mixer(s, fs)
        z, lam_, x = _split(nxt, *shapes)
        x = problem.proj(x) if mixer is not None else x
        if history is not None:
            history.append((time.perf_counter() - t0, k, x.clone()))
        if tol > 0 and float(res.max()) <= tol:
            break
    if best is not None:
        z, lam_, x = best
    elapsed = time.perf_counter() - t0
    r = stationarity(problem, z, lam_, x, step_size) if residuals else None
    return JIIOResult(x, z, lam_, r, k, k, k, elapsed, history, objective=obj)


def _accept(
    k: int,
    best: list[Tensor] | None,
    best_res: Tensor,
    best_obj: Tensor,
    state: tuple[Tensor, Tensor, Tensor],
    res: Tensor,
    obj: Tensor,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The reference's acceptance rule for the state evaluated at iteration ``k`` (module docstring)."""
    if best is None:
        return [t.clone() for t in state], res.clone(), obj.clone()
    early = k < 10
    lower = res < best_res
    take = lower | early | ((obj < best_obj) & (res < 1.3 * best_res))
    out = [torch.where(bview(take, t), t, b) for t, b in zip(state, best, strict=True)]
    new_res = torch.where(lower | early, res, best_res)
    return out, new_res, torch.where(take, obj, best_obj)
