"""The attack's threat model: per-sample ε-balls in L∞ or L2 (norms, projection, uniform random start)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["EPS", "NORMS", "per_sample", "project", "random_start", "sample_norms"]

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
