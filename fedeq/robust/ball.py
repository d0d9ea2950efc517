"""The attack's threat model: per-sample ε-balls in L∞ or L2 (norms, projections, uniform random start).

:func:`project_ball_box` is the exact Euclidean projection onto ``B_ε(x₀) ∩ [lo, hi]^d``. For L∞ the set is a
box and the projection is a clip. For L2, with ``x₀`` in the box, the KKT conditions of
``min ½||x - v||²  s.t.  ||x - x₀||₂ ≤ ε, lo ≤ x ≤ hi`` with multiplier ``μ ≥ 0`` of the ball give, coordinate
by coordinate,

    x(μ) = clip((v + μ x₀) / (1 + μ), lo, hi) = clip(x₀ + t (v - x₀), lo, hi),    t = 1 / (1 + μ) ∈ (0, 1].

``μ = 0`` (``t = 1``) when ``clip(v)`` is already in the ball; otherwise ``φ(t) = ||x(t) - x₀||₂`` is
continuous and nondecreasing in ``t`` (each clipped coordinate moves away from ``x₀`` as ``t`` grows) with
``φ(0) = 0``, and complementary slackness asks for ``φ(t) = ε``: found by bisection on ``t``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["EPS", "NORMS", "per_sample", "project", "project_ball_box", "random_start", "sample_norms"]

NORMS: tuple[str, ...] = ("linf", "l2")
"""The attack norms (``train.attack_norm`` accepts the same names)."""
EPS = 1e-12
"""Floor of a norm before dividing by it."""


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A (B,) vector shaped to broadcast over the batch ``like`` (one value per sample)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def sample_norms(t: Tensor, norm: str) -> Tensor:
    """``||t_i||_p`` of each sample (shape (B,)), p = ∞ (``linf``) or 2 (otherwise)."""
    flat = t.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project(delta: Tensor, epsilon: float | Tensor, norm: str) -> Tensor:
    """Euclidean projection of each sample's ``delta`` onto ``{||δ||_p ≤ ε}`` (p = ∞ or 2)."""
    if norm == "linf":
        eps = per_sample(
            torch.as_tensor(epsilon, dtype=delta.dtype, device=delta.device).expand(delta.shape[0]), delta
        )
        return torch.maximum(torch.minimum(delta, eps), -eps)
    if norm == "l2":
        n = delta.flatten(1).norm(dim=1)
        factor = torch.as_tensor(epsilon, dtype=delta.dtype, device=delta.device) / n.clamp_min(EPS)
        return delta * per_sample(factor.clamp(max=1.0), delta)
    raise ValueError(f"norm must be one of {', '.join(NORMS)} (got {norm!r})")


def project_ball_box(
    v: Tensor,
    x0: Tensor,
    epsilon: float | Tensor,
    norm: str,
    clamp: tuple[float, float] = (0.0, 1.0),
    iters: int = 60,
) -> Tensor:
    """The exact Euclidean projection of each sample of ``v`` onto ``B_ε(x₀) ∩ [lo, hi]^d`` (see above).

    ``x₀`` must lie in the box. L2: bisection on ``t`` (``iters`` halvings), returning the feasible end of
    the final bracket, so ``||x - x₀||₂ ≤ ε`` holds exactly.
    """
    lo, hi = clamp
    if norm == "linf":
        return (x0 + project(v - x0, epsilon, norm)).clamp(lo, hi)
    if norm != "l2":
        raise ValueError(f"norm must be one of {', '.join(NORMS)} (got {norm!r})")
    d = v - x0
    eps = torch.as_tensor(epsilon, dtype=v.dtype, device=v.device).expand(v.shape[0])

    def dist(t: Tensor) -> Tensor:
        return ((x0 + per_sample(t, d) * d).clamp(lo, hi) - x0).flatten(1).norm(dim=1)

    low = torch.zeros_like(eps)  # φ(low) ≤ ε
    high = torch.ones_like(eps)
    inside = dist(high) <= eps
    for _ in range(iters):
        mid = 0.5 * (low + high)
        ok = dist(mid) <= eps
        low = torch.where(ok, mid, low)
        high = torch.where(ok, high, mid)
    t = torch.where(inside, torch.ones_like(low), low)
    return (x0 + per_sample(t, d) * d).clamp(lo, hi)


def random_start(x: Tensor, epsilon: float, norm: str, generator: torch.Generator | None = None) -> Tensor:
    """A perturbation drawn uniformly from the ε-ball (L∞: uniform cube; L2: uniform in the ball)."""
    shape = x.shape
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=x.dtype)
        return ((2 * u - 1) * epsilon).to(x.device)
    g = torch.randn(shape, generator=generator, dtype=x.dtype)
    d = g[0].numel()
    g = g / per_sample(g.flatten(1).norm(dim=1).clamp_min(EPS), x)
    r = torch.rand(shape[0], generator=generator, dtype=x.dtype) ** (1.0 / d) * epsilon
    return (g * per_sample(r, x)).to(x.device)
