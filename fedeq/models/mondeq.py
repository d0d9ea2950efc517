"""Monotone operator equilibrium networks (MON-DEQ, Winston & Kolter, NeurIPS 2020): dense and convolutional.

The layer computes ``z* = relu(W z* + U x + b)`` with the parametrization

    W = (1 - m) I - AᵀA + B - Bᵀ,      so      I - W = m I + AᵀA - (B - Bᵀ),

whose symmetric part is ``⪰ m I``. The operator ``F(z) = (I - W) z - (U x + b)`` is therefore m-strongly
monotone and ``L = ||I - W||₂``-Lipschitz; ``relu`` is the proximal map of the indicator of the non-negative
orthant, so ``z*`` is the unique zero of ``F + ∂𝟙_{z≥0}`` for *every* input and every ``A, B``.

Convolutional variant (:class:`ConvMonDEQ`): ``A`` and ``B`` are C × C × k × k kernels of circular
convolutions; in the Fourier domain ``W`` is, at every frequency ``ω``, the C × C matrix
``(1 - m) I - Â(ω)ᴴÂ(ω) + B̂(ω) - B̂(ω)ᴴ``, so the same margin holds and the resolvent is one C × C inverse per
frequency (:class:`ConvOperator`).

Operator splitting. Each method is a fixed-point map ``T`` on a state ``s`` with ``z* = P(s*)``; one
application of ``T`` is one function evaluation in the convention of :mod:`fedeq.deq.solvers.core`:

- forward-backward (``fb``), state ``z``:  ``T(z) = relu(z - α((I - W) z - (U x + b)))``. Converges for
  ``0 < α < 2m/L²``; the default ``α = m/L²`` minimizes the classical bound ``√(1 - 2αm + α²L²)``.
- Peaceman-Rachford (``pr``), state ``u``:  ``T(u) = 2 R(2 relu(u) - u) - (2 relu(u) - u)`` with the exact
  resolvent ``R(v) = (I + α(I - W))⁻¹ (v + α(U x + b))`` (a dense inverse, computed once per call), and
  ``z* = relu(u*)``. Converges for every ``α > 0`` (default 1).

The device tier's ``solver`` is applied to ``T``: ``fixed_point`` runs the plain splitting iteration of the
paper, ``anderson``/``broyden`` accelerate it; budgets, tolerances and per-sample statistics follow
:mod:`fedeq.deq.solvers.core` exactly (``nfe`` counts applications of ``T``, residual ``||T(s) - s||``).

Backward (implicit gradient, ``backward="ift"``). With ``y = W z* + U x + b``, ``D = diag(relu'(y))`` and
``w = ∂ℓ/∂z*``, the gradient with respect to ``y`` is ``x = D (I - Wᵀ D)⁻¹ w``: the unique solution of the
monotone inclusion

    0 ∈ (I - Wᵀ) x + ∂f̃(x),      f̃(x) = ½ xᵀ(D⁻¹ - I) x - wᵀx      (x_i = 0 where D_ii = 0),

solved with the *same* splitting under the backward budget: ``prox_{αf̃}(v) = D(v + αw) / (D + α(I - D))``
and resolvent ``(I + α(I - Wᵀ))⁻¹``, the transpose of the forward one. Then ``∂ℓ/∂θ = (∂y/∂θ)ᵀ x``.
``jfb`` uses ``x = D w``; ``phantom`` unrolls damped steps of ``z ← relu(W z + U x + b)``; ``broyden_reuse``
has no Broyden estimate of the adjoint operator here and runs the ``ift`` splitting instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq.layer import BackwardStats, DEQOutput, DEQSettings, phantom_unroll, solve_backward
from fedeq.deq.regularizers import jacobian_frobenius
from fedeq.deq.solvers.core import SolverStats, solve
from fedeq.models.core import ModelOutput, _get, _prod

Tensor = torch.Tensor

SPLITTINGS: tuple[str, ...] = ("fb", "pr")


def _check_splitting(splitting: str) -> None:
    if splitting not in SPLITTINGS:
        raise ValueError(f"splitting must be one of {', '.join(SPLITTINGS)} (got {splitting!r})")


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


def default_alpha(W: Tensor | Operator, splitting: str, margin: float) -> float:
    """Step size: ``m / ||I - W||₂²`` for ``fb``, ``1`` for ``pr``."""
    _check_splitting(splitting)
    if splitting == "pr":
        return 1.0
    lip = float(as_operator(W).lipschitz())
    return float(margin) / max(lip * lip, 1e-12)


def splitting_map(W: Tensor | Operator, inj: Tensor, splitting: str, alpha: float) -> tuple[Any, Any]:
    """The forward map ``T`` on the splitting state and the read-out ``P`` with ``z = P(s)``.

    A dense ``W`` acts on row vectors: states have shape (batch, d) and ``W z`` is ``z @ Wᵀ``.
    """
    _check_splitting(splitting)
    op = as_operator(W)
    if splitting == "fb":

        def T_fb(z: Tensor) -> Tensor:
            return F.relu(torch.lerp(z, op.apply(z) + inj, alpha))

        return T_fb, (lambda z: z)
    solve_r, _ = op.resolvent(alpha)
    a_inj = alpha * inj

    def T_pr(u: Tensor) -> Tensor:
        v = 2 * F.relu(u) - u
        return 2 * solve_r(v + a_inj) - v

    return T_pr, F.relu


def adjoint_map(W: Tensor | Operator, d: Tensor, w: Tensor, splitting: str, alpha: float) -> tuple[Any, Any]:
    """The backward map on the adjoint state and its read-out ``x = P(s)`` (``x`` = gradient w.r.t. ``y``).

    ``d`` holds the activation derivatives ``relu'(y) ∈ [0, 1]``; ``w`` the incoming gradient ``∂ℓ/∂z*``.
    """
    _check_splitting(splitting)
    op = as_operator(W)
    denom = d + alpha * (1 - d)

    def prox(v: Tensor) -> Tensor:
        return d * (v + alpha * w) / denom

    if splitting == "fb":

        def T_fb(x: Tensor) -> Tensor:
            return prox(torch.lerp(x, op.apply_t(x), alpha))

        return T_fb, (lambda x: x)
    _, solve_rt = op.resolvent(alpha)

    def T_pr(u: Tensor) -> Tensor:
        v = 2 * prox(u) - u
        return 2 * solve_rt(v) - v

    return T_pr, prox


def monotone_solve(
    W: Tensor | Operator,
    inj: Tensor,
    z0: Tensor | None = None,
    *,
    splitting: str = "pr",
    alpha: float | None = None,
    margin: float | None = None,
    solver: str = "fixed_point",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **solver_options: Any,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = relu(W z + inj)`` by operator splitting; returns ``(z*, stats)`` (no gradient).

    ``margin`` (the monotonicity parameter ``m``) is needed only for the default ``fb`` step size.
    ``stats.extra`` holds ``splitting`` and ``alpha``.
    """
    with torch.no_grad():
        op = as_operator(W)
        if alpha is None:
            alpha = default_alpha(op, splitting, margin if margin is not None else float(op.margin()))
        T, read = splitting_map(op, inj, splitting, alpha)
        s0 = torch.zeros_like(inj) if z0 is None else z0
        s, stats = solve(T, s0, solver, max_iter, tol, stop_mode, **solver_options)
        stats.extra.update(splitting=splitting, alpha=alpha)
        return read(s), stats


class MonotoneLinear(nn.Module):
    """Parameters ``A, B`` of ``W = (1 - m) I - AᵀA + B - Bᵀ``; ``m`` is a persistent buffer (it travels)."""

    def __init__(self, dim: int, m: float = 0.1, init_scale: float = 0.5) -> None:
        super().__init__()
        _check_margin(m)
        self.dim = dim
        self.A = nn.Parameter(torch.randn(dim, dim) * (init_scale / dim**0.5))
        self.B = nn.Parameter(torch.randn(dim, dim) * (init_scale / dim**0.5))
        self.register_buffer("m", torch.tensor(float(m)))

    def weight(self) -> Tensor:
        return monotone_weight(self.A, self.B, self.m)

    def operator(self, inj: Tensor) -> DenseOperator:
        return DenseOperator(self.weight())


class MonotoneConv(nn.Module):
    """Kernels ``A, B`` (C × C × k × k) of the convolutional ``W`` (circular padding); ``m`` is a buffer."""

    def __init__(self, channels: int, m: float = 0.1, kernel_size: int = 3, init_scale: float = 0.5) -> None:
        super().__init__()
        _check_margin(m)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1 (got {kernel_size!r})")
        scale = init_scale / (channels * kernel_size**2) ** 0.5
        self.A = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size) * scale)
        self.B = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size) * scale)
        self.register_buffer("m", torch.tensor(float(m)))

    def operator(self, inj: Tensor) -> ConvOperator:
        """The operator for maps of the spatial size of ``inj`` (B, C, H, W)."""
        return ConvOperator.from_kernels(self.A, self.B, self.m, inj.shape[-2], inj.shape[-1])


def _check_margin(m: float) -> None:
    if not 0 < m <= 1:
        raise ValueError(f"monotone_m must be in (0, 1] (got {m!r})")


class _ImplicitRelu(torch.autograd.Function):
    """Value ``relu(y)``; gradient ``x`` of the adjoint inclusion solved by splitting (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, op: Operator, settings: DEQSettings, split: tuple, bstats: Any
    ) -> Tensor:
        ctx.save_for_backward(y.detach())
        ctx.op, ctx.settings, ctx.split, ctx.bstats = op, settings, split, bstats
        return F.relu(y)

    @staticmethod
    def backward(ctx: Any, w: Tensor) -> tuple[Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        s: DEQSettings = ctx.settings
        splitting, alpha = ctx.split
        with torch.no_grad():
            d = (y > 0).to(w.dtype)
            T, read = adjoint_map(ctx.op, d, w, splitting, alpha)
            x = read(solve_backward(T, torch.zeros_like(w), s, ctx.bstats))
        return x, None, None, None, None


class _MonotoneEquilibrium(nn.Module):
    """Shared forward of the MON-DEQ classifiers: subclasses set ``inject``, ``mon`` and ``head``."""

    inject: nn.Module
    mon: MonotoneLinear | MonotoneConv
    head: nn.Module

    def _setup(self, splitting: str, alpha: float | None, deq_settings: dict[str, Any]) -> None:
        _check_splitting(splitting)
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 or None (got {alpha!r})")
        self.splitting = splitting
        self.alpha = alpha
        self.settings = DEQSettings().override(**deq_settings).validate()

    def _injection(self, x: Tensor) -> Tensor:
        return self.inject(x)

    def equilibrium(self, x: Tensor, **overrides: Any) -> DEQOutput:
        """The equilibrium ``z*`` of a batch with statistics (and the gradient attached when training)."""
        splitting = overrides.pop("splitting", None) or self.splitting
        alpha = overrides.pop("alpha", None) or self.alpha
        _check_splitting(splitting)
        s = self.settings.override(**overrides) if overrides else self.settings
        inj = self._injection(x)
        op = self.mon.operator(inj)
        opd = op.detach()
        with torch.no_grad():
            a = default_alpha(opd, splitting, float(self.mon.m)) if alpha is None else float(alpha)
            z_star, fstats = monotone_solve(
                opd,
                inj.detach(),
                splitting=splitting,
                alpha=a,
                solver=s.solver,
                max_iter=s.f_max_iter,
                tol=s.tol,
                stop_mode=s.stop_mode,
                **s.solver_options,
            )
        if not torch.is_grad_enabled():
            return DEQOutput(z_star, fstats, None, s)
        need_z_grad = s.jac_reg_samples > 0
        z_in = z_star.detach().requires_grad_(need_z_grad)
        y = op.apply(z_in) + inj
        jac_loss = jacobian_frobenius(F.relu(y), z_in, s.jac_reg_samples) if need_z_grad else None
        mode = "ift" if s.backward == "broyden_reuse" else s.backward
        bstats = BackwardStats(mode=mode)
        graph_evals = 1
        if mode == "jfb":
            z_out = F.relu(y)
        elif mode == "phantom":
            z_out, steps = phantom_unroll(lambda z: F.relu(op.apply(z) + inj), z_in, F.relu(y), s)
            graph_evals = steps
            bstats.nfe, bstats.ready = steps, True
        else:
            z_out = _ImplicitRelu.apply(y, opd, s, (splitting, a), bstats)
        if mode != s.backward:
            s = replace(s, backward=mode)
        return DEQOutput(z_out, fstats, bstats, s, jac_loss=jac_loss, graph_evals=graph_evals)

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        out = self.equilibrium(x, **deq_overrides)
        return ModelOutput(self.head(out.z), out)


class MonDEQ(_MonotoneEquilibrium):
    """MON-DEQ classifier for flattened inputs: ``z* = relu(W z* + U x + b)``, logits ``= head(z*)``.

    Args:
        in_features, num_classes: input size and number of classes.
        hidden: width ``d`` of the equilibrium state.
        monotone_m: the margin ``m`` in ``(0, 1]``.
        splitting: ``"pr"`` (Peaceman-Rachford) or ``"fb"`` (forward-backward); per call ``splitting=...``.
        alpha: splitting step size (``None``: ``m/L²`` for fb, 1 for pr); per call ``alpha=...``.
        **deq_settings: fields of :class:`fedeq.deq.layer.DEQSettings` (solver applied to the splitting map,
            budgets, tolerance, backward mode); the same names are accepted as per-call overrides.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        monotone_m: float = 0.1,
        splitting: str = "pr",
        alpha: float | None = None,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        self._setup(splitting, alpha, deq_settings)
        self.inject = nn.Linear(in_features, hidden)
        self.mon = MonotoneLinear(hidden, monotone_m)
        self.head = nn.Linear(hidden, num_classes)

    def _injection(self, x: Tensor) -> Tensor:
        return self.inject(x.flatten(1))


class ConvMonDEQ(_MonotoneEquilibrium):
    """Convolutional MON-DEQ: ``z* = relu(W z* + conv(x))`` with a monotone convolutional ``W`` (circular
    padding, resolvents per frequency through the FFT); logits from a 4 × 4 average pool of ``z*``.

    Args: as :class:`MonDEQ`, with ``in_channels`` and ``channels`` (equilibrium channels) for the sizes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 16,
        monotone_m: float = 0.1,
        splitting: str = "pr",
        alpha: float | None = None,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        self._setup(splitting, alpha, deq_settings)
        self.inject = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.mon = MonotoneConv(channels, monotone_m)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, num_classes)
        )


def build_mondeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    """Registry factory: ``hidden`` and ``monotone_m`` from ``cfg`` (defaults 64 and 0.1)."""
    m = float(_get(cfg, "monotone_m", 0.1))
    hidden = int(_get(cfg, "hidden", 64))
    return MonDEQ(int(_prod(input_shape)), num_classes, hidden=hidden, monotone_m=m, **deq)


def build_conv_mondeq(
    input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]
) -> nn.Module:
    """Registry factory: ``channels`` and ``monotone_m`` from ``cfg`` (defaults 16 and 0.1)."""
    m = float(_get(cfg, "monotone_m", 0.1))
    return ConvMonDEQ(
        int(input_shape[0]), num_classes, channels=int(_get(cfg, "channels", 16)), monotone_m=m, **deq
    )
