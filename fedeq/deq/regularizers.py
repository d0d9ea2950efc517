"""Regularizers and weight reparametrizations that keep DEQ dynamics well behaved."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def jacobian_frobenius(fz: Tensor, z: Tensor, n_samples: int = 1, create_graph: bool = True) -> Tensor:
    """Hutchinson estimate of ``||J_f(z)||_F² / d`` averaged over the batch.

    For ``ε ~ N(0, I)``, ``E ||εᵀ J||² = ||J||_F²``; each probe costs one vector-Jacobian product.
    ``fz`` must be ``f(z)`` computed with ``z.requires_grad``. With ``create_graph`` the estimate is
    differentiable, so it can be added to the training loss (Bai et al., 2021).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1 (got {n_samples!r})")
    total = fz.new_zeros(())
    for _ in range(n_samples):
        eps = torch.randn_like(fz)
        (vjp,) = torch.autograd.grad(fz, z, eps, create_graph=create_graph, retain_graph=True)
        total = total + vjp.pow(2).sum() / fz.numel()
    return total / n_samples


def spectral_norm_estimate(
    weight: Tensor, n_iter: int = 20, generator: torch.Generator | None = None
) -> Tensor:
    """Largest singular value of ``weight`` (matricized as ``(out, -1)``) by power iteration."""
    w = weight.detach().reshape(weight.shape[0], -1)
    v = torch.randn(w.shape[1], 1, dtype=w.dtype, device=w.device, generator=generator)
    v = v / v.norm()
    for _ in range(n_iter):
        u = w @ v
        u = u / (u.norm() + 1e-12)
        v = w.T @ u
        v = v / (v.norm() + 1e-12)
    return (u.T @ w @ v).squeeze()


def apply_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Reparametrize ``module.<name>`` so its spectral norm is 1 (``torch.nn.utils.parametrizations``)."""
    return nn.utils.parametrizations.spectral_norm(module, name=name)


def apply_weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrize ``module.<name> = g · v / ||v||`` (weight normalization)."""
    return nn.utils.parametrizations.weight_norm(module, name=name, dim=dim)
