"""Monotone linear operators ``W`` of MON-DEQ, dense and convolutional.

The parametrization

    W = (1 - m) I - AᵀA + B - Bᵀ,      so      I - W = m I + AᵀA - (B - Bᵀ),

has a symmetric part ``⪰ m I``. The operator ``F(z) = (I - W) z - (U x + b)`` is therefore m-strongly
monotone and ``L = ||I - W||₂``-Lipschitz; ``relu`` is the proximal map of the indicator of the non-negative
orthant, so ``z*`` is the unique zero of ``F + ∂𝟙_{z≥0}`` for *every* input and every ``A, B``.

Convolutional variant: ``A`` and ``B`` are C × C × k × k kernels of circular convolutions; in the Fourier
domain ``W`` is, at every frequency ``ω``, the C × C matrix ``(1 - m) I - Â(ω)ᴴÂ(ω) + B̂(ω) - B̂(ω)ᴴ``, so
the same margin holds and the resolvent is one C × C inverse per frequency (:class:`ConvOperator`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "ConvOperator",
    "DenseOperator",
    "Operator",
    "as_operator",
    "monotone_margin",
    "monotone_weight",
]


def monotone_weight(A: Tensor, B: Tensor, m: float | Tensor) -> Tensor:
    """``W = (1 - m) I - AᵀA + B - Bᵀ`` (square ``A``, ``B`` of shape (d, d))."""
    eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
    return (1 - m) * eye - A.T @ A + B - B.T


class DenseOperator:
    """A dense ``W`` (d × d) acting on row vectors: ``apply(z) = z Wᵀ``."""

    def __init__(self, W: Tensor) -> None:
        self.W = W

    def apply(self, z: Tensor) -> Tensor:
        """``W z``."""
        return z @ self.W.T

    def apply_t(self, z: Tensor) -> Tensor:
        """``Wᵀ z``."""
        return z @ self.W

    def detach(self) -> DenseOperator:
        return DenseOperator(self.W.detach())

    def _eye(self) -> Tensor:
        return torch.eye(self.W.shape[0], dtype=self.W.dtype, device=self.W.device)

    def margin(self) -> Tensor:
        """``λ_min(sym(I - W))``."""
        G = self._eye() - self.W
        return torch.linalg.eigvalsh(0.5 * (G + G.T))[0]

    def lipschitz(self) -> Tensor:
        """``||I - W||₂``."""
        return torch.linalg.matrix_norm(self._eye() - self.W, ord=2)

    def resolvent(self, alpha: float) -> tuple[Any, Any]:
        """``v ↦ (I + α(I - W))⁻¹ v`` and ``v ↦ (I + α(I - Wᵀ))⁻¹ v`` (one dense inverse)."""
        eye = self._eye()
        Rinv = torch.linalg.inv(eye + alpha * (eye - self.W))
        return (lambda v: v @ Rinv.T), (lambda v: v @ Rinv)


class ConvOperator:
    """A convolutional monotone ``W`` acting on (B, C, H, W) maps with circular padding, kept in the
    Fourier domain: at every frequency ``ω`` it is the C × C matrix
    ``Ŵ(ω) = (1 - m) I - Â(ω)ᴴÂ(ω) + B̂(ω) - B̂(ω)ᴴ``, so ``sym(I - W) ⪰ m I`` frequency by frequency and
    resolvents are per-frequency C × C inverses."""

    def __init__(self, W_hat: Tensor, width: int) -> None:
        self.W_hat = W_hat  # (H, W//2 + 1, C, C) complex: the other half of the spectrum is its conjugate
        self.width = width

    @staticmethod
    def kernel_fft(K: Tensor, height: int, width: int) -> Tensor:
        """``(H, W//2 + 1, C_out, C_in)`` transfer matrices (half spectrum) of the circular
        cross-correlation with ``K`` (the same operator as ``conv2d`` on circularly padded input)."""
        k1, k2 = K.shape[-2:]
        g = F.pad(K.flip(-2, -1), (0, width - k2, 0, height - k1))
        g = torch.roll(g, shifts=(-(k1 // 2), -(k2 // 2)), dims=(-2, -1))
        return torch.fft.rfft2(g).permute(2, 3, 0, 1)

    @classmethod
    def from_kernels(cls, A: Tensor, B: Tensor, m: float | Tensor, height: int, width: int) -> ConvOperator:
        a, b = cls.kernel_fft(A, height, width), cls.kernel_fft(B, height, width)
        eye = torch.eye(A.shape[0], dtype=a.dtype, device=a.device)
        W_hat = (1 - m) * eye - a.mH @ a + b - b.mH
        return cls(W_hat, width)

    def _mul(self, M: Tensor, z: Tensor) -> Tensor:
        Z = torch.fft.rfft2(z).permute(2, 3, 1, 0).contiguous()  # (H, Wf, C, B)
        Y = (M @ Z.to(M.dtype)).permute(3, 2, 0, 1).contiguous()
        return torch.fft.irfft2(Y, s=(z.shape[-2], self.width)).to(z.dtype)

    def apply(self, z: Tensor) -> Tensor:
        return self._mul(self.W_hat, z)

    def apply_t(self, z: Tensor) -> Tensor:
        return self._mul(self.W_hat.mH, z)

    def detach(self) -> ConvOperator:
        return ConvOperator(self.W_hat.detach(), self.width)

    def _eye(self) -> Tensor:
        return torch.eye(self.W_hat.shape[-1], dtype=self.W_hat.dtype, device=self.W_hat.device)

    def margin(self) -> Tensor:
        G = self._eye() - self.W_hat
        return torch.linalg.eigvalsh(0.5 * (G + G.mH)).min()

    def lipschitz(self) -> Tensor:
        return torch.linalg.matrix_norm(self._eye() - self.W_hat, ord=2).max()

    def resolvent(self, alpha: float) -> tuple[Any, Any]:
        eye = self._eye()
        R = torch.linalg.inv(eye + alpha * (eye - self.W_hat))
        Rh = R.mH
        return (lambda v: self._mul(R, v)), (lambda v: self._mul(Rh, v))


Operator = DenseOperator | ConvOperator


def as_operator(W: Tensor | Operator) -> Operator:
    """A dense matrix is wrapped in :class:`DenseOperator`; operators pass through."""
    return DenseOperator(W) if isinstance(W, Tensor) else W


def monotone_margin(W: Tensor | Operator) -> Tensor:
    """Strong-monotonicity margin ``λ_min(sym(I - W))`` (``≥ m`` for the parametrization above)."""
    return as_operator(W).margin()
