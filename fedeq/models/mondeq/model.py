"""The MON-DEQ classifiers ``mondeq`` (dense) and ``conv_mondeq`` (convolutional) and their parameters.

Backward modes: ``ift`` solves the adjoint inclusion by splitting (:mod:`~fedeq.models.mondeq.adjoint`);
``broyden_reuse`` has no Broyden estimate of the adjoint operator here and runs the ``ift`` splitting instead.
Every other registered mode (``phantom``, ``jfb``, plugins) goes through the shared
:meth:`fedeq.deq.backward.Backward.attach` with the *splitting map* ``T`` as the step, at the splitting
state ``s*`` (``z* = P(s*)``): ``phantom`` differentiates ``k`` damped steps ``s ← (1-λ) s + λ T(s)`` and
``jfb`` one step ``T(s*)``. ``T`` is averaged (``fb`` inside its step-size bound, ``pr`` for every ``α``:
the reflected resolvents of a strongly monotone operator contract), so the unrolled gradient approaches
the implicit one as ``k`` grows; the plain map ``z ← relu(W z + U x + b)`` is not a contraction for a
monotone ``W`` (spectral radius of ``diag(relu') W`` above 1 at initialization and after training) and its
unrolled gradient does not. For ``fb`` one step scales the gradient by ``α`` (``∂T/∂θ = α D ∂y/∂θ``).

Defaults follow the reference experiments: margin ``m = 1`` and a tuned step size. Every ``retune_every``
training calls the step of the splitting in use is searched again on the batch (halve from 1 while the
iteration count does not grow) and kept in the persistent buffer ``alpha_tuned`` (it travels and is averaged
like the weights); it starts at 1 for ``pr`` and 0.25 for ``fb``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq import BackwardStats, DEQOutput, DEQSettings
from fedeq.deq.backward import get_backward
from fedeq.deq.regularizers import jacobian_frobenius
from fedeq.models.base import ModelOutput, config_value, flattened_size
from fedeq.models.mondeq.adjoint import ImplicitRelu
from fedeq.models.mondeq.operators import ConvOperator, DenseOperator, Operator, monotone_weight
from fedeq.models.mondeq.splitting import (
    SPLITTINGS,
    check_splitting,
    default_alpha,
    splitting_map,
    splitting_solve,
    tune_alpha,
)
from fedeq.registry import MODELS

Tensor = torch.Tensor

__all__ = ["ConvMonDEQ", "MonDEQ", "MonotoneConv", "MonotoneLinear", "build_conv_mondeq", "build_mondeq"]


class MonotoneLinear(nn.Module):
    """Parameters ``A, B`` of ``W = (1 - m) I - AᵀA + B - Bᵀ``; ``m`` is a persistent buffer (it travels)."""

    def __init__(self, dim: int, m: float = 1.0, init_scale: float = 0.5) -> None:
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

    def __init__(self, channels: int, m: float = 1.0, kernel_size: int = 3, init_scale: float = 0.5) -> None:
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
    """``ValueError`` unless the monotonicity margin ``m`` is in ``(0, 1]``."""
    if not 0 < m <= 1:
        raise ValueError(f"monotone_m must be in (0, 1] (got {m!r})")


class _MonotoneEquilibrium(nn.Module):
    """Shared forward of the MON-DEQ classifiers: subclasses set ``inject``, ``mon`` and ``head``."""

    inject: nn.Module
    mon: MonotoneLinear | MonotoneConv
    head: nn.Module

    def _setup(
        self, splitting: str, alpha: float | None, retune_every: int, deq_settings: dict[str, Any]
    ) -> None:
        check_splitting(splitting)
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 or None (got {alpha!r})")
        if isinstance(retune_every, bool) or not isinstance(retune_every, int) or retune_every < 0:
            raise ValueError(f"retune_every must be an integer >= 0 (got {retune_every!r})")
        self.splitting = splitting
        self.alpha = alpha
        self.retune_every = retune_every
        self._train_calls = 0
        self.settings = DEQSettings().override(**deq_settings).validate()
        start = [default_alpha(None, name, 1.0) for name in SPLITTINGS]
        self.register_buffer("alpha_tuned", torch.tensor(start, dtype=torch.float64))

    def step_size(self, splitting: str, opd: Operator, inj: Tensor, s: DEQSettings) -> float:
        """The splitting step ``α``: the fixed ``alpha`` if one was given, else the tuned one of this
        splitting (``alpha_tuned``), searched again on the batch every ``retune_every`` training calls with
        :func:`~fedeq.models.mondeq.splitting.tune_alpha` (kept when no step converges in 100 steps)."""
        if self.alpha is not None:
            return float(self.alpha)
        index = SPLITTINGS.index(splitting)
        if self.training and torch.is_grad_enabled():
            self._train_calls += 1
            if self.retune_every and self._train_calls % self.retune_every == 0:
                with torch.no_grad():
                    alpha, its = tune_alpha(opd, inj.detach(), splitting, max_iter=100, tol=s.tol)
                if its <= 100:
                    self.alpha_tuned[index] = alpha
        return float(self.alpha_tuned[index])

    def _injection(self, x: Tensor) -> Tensor:
        return self.inject(x)

    def equilibrium(self, x: Tensor, **overrides: Any) -> DEQOutput:
        """The equilibrium ``z*`` of a batch with statistics (and the gradient attached when training)."""
        splitting = overrides.pop("splitting", None) or self.splitting
        alpha = overrides.pop("alpha", None)
        check_splitting(splitting)
        s = self.settings.override(**overrides) if overrides else self.settings
        inj = self._injection(x)
        op = self.mon.operator(inj)
        opd = op.detach()
        a = self.step_size(splitting, opd, inj, s) if alpha is None else float(alpha)
        with torch.no_grad():
            state, fstats = splitting_solve(
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
            z_star = splitting_map(opd, inj.detach(), splitting, a)[1](state)
        if not torch.is_grad_enabled():
            return DEQOutput(z_star, fstats, None, s)
        need_z_grad = s.jac_reg_samples > 0
        mode = "ift" if s.backward == "broyden_reuse" else s.backward
        jac_loss = None
        if mode == "ift" or need_z_grad:
            z_in = z_star.detach().requires_grad_(need_z_grad)
            y = op.apply(z_in) + inj
            jac_loss = jacobian_frobenius(F.relu(y), z_in, s.jac_reg_samples) if need_z_grad else None
        bstats = BackwardStats(mode=mode)
        if mode == "ift":
            z_out, graph_evals = ImplicitRelu.apply(y, opd, s, (splitting, a), bstats), 1
        else:  # the shared backward modes, on the splitting map (module docstring)
            backward = get_backward(mode)()
            T, read = splitting_map(op, inj, splitting, a)
            s_in = state.detach().requires_grad_(backward.needs_z_grad)
            s_out, graph_evals = backward.attach(T, s_in, T(s_in), fstats, s, bstats)
            z_out = read(s_out)
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
        monotone_m: the margin ``m`` in ``(0, 1]`` (default 1, as in the reference experiments).
        splitting: ``"pr"`` (Peaceman-Rachford) or ``"fb"`` (forward-backward); per call ``splitting=...``.
        alpha: fixed splitting step size, or ``None`` for the tuned one (:meth:`step_size`: it starts at 1 for
            pr and 0.25 for fb and travels in the state dict as ``alpha_tuned``); per call ``alpha=...``.
        retune_every: training calls between two step-size searches (0: never search).
        **deq_settings: fields of :class:`fedeq.deq.layer.DEQSettings` (solver applied to the splitting map,
            budgets, tolerance, backward mode); the same names are accepted as per-call overrides.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        monotone_m: float = 1.0,
        splitting: str = "pr",
        alpha: float | None = None,
        retune_every: int = 100,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        self._setup(splitting, alpha, retune_every, deq_settings)
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
        monotone_m: float = 1.0,
        splitting: str = "pr",
        alpha: float | None = None,
        retune_every: int = 100,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        self._setup(splitting, alpha, retune_every, deq_settings)
        self.inject = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.mon = MonotoneConv(channels, monotone_m)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, num_classes)
        )


@MODELS.register("mondeq")
def build_mondeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory: ``hidden`` and ``monotone_m`` from ``cfg`` (defaults 64 and 1)."""
    m = float(config_value(cfg, "monotone_m", 1.0))
    hidden = int(config_value(cfg, "hidden", 64))
    return MonDEQ(int(flattened_size(input_shape)), num_classes, hidden=hidden, monotone_m=m)


@MODELS.register("conv_mondeq")
def build_conv_mondeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory: ``channels`` and ``monotone_m`` from ``cfg`` (defaults 16 and 1)."""
    m = float(config_value(cfg, "monotone_m", 1.0))
    return ConvMonDEQ(
        int(input_shape[0]), num_classes, channels=int(config_value(cfg, "channels", 16)), monotone_m=m
    )
