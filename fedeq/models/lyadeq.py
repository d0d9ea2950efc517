"""LyaDEQ (Chu, Wei, Liu, Zhao): a free DEQ cell made Lyapunov-stable, then an orthogonal layer, a classifier.

Free cell and its dynamics. ``f(z; x) = tanh(A z + u)``, ``u = U x + b`` (``A`` unconstrained), read as the
continuous dynamics ``ż = F(z) = f(z; x) - z`` whose equilibria are the DEQ's fixed points.

Lyapunov function (an input-convex network in ``z``, conditioned on ``x``):

    V(z; x) = ½ ||z - u||² + Σ_j a_j · softplus(w_jᵀ z + c_j),    a ∈ (0, a_max)^k,  W = W̃ / ||W̃||₂,

1-strongly convex in ``z`` and ``L``-smooth with ``L = 1 + max_j a_j / 4`` (``a``, ``c`` depend on ``u``; see
:mod:`fedeq.models.potential_deq`, which shares ``V``).

Stability module (Manek & Kolter's projection). The free field, scaled so that it vanishes where ``∇V``
does, ``F̃ = γ ||∇V|| F / (1 + ||F||)``, is projected onto the half-space where ``V`` decays:

    F_s(z) = F̃(z) - relu(∇Vᵀ F̃(z) + β ||∇V||²) ∇V / ||∇V||²,      so   ∇Vᵀ F_s ≤ -β ||∇V||².

Manek & Kolter ask ``V̇ ≤ -αV`` with ``V`` vanishing at an equilibrium fixed in advance (the origin); a DEQ's
equilibrium depends on ``x`` and is unknown before the solve, so fedeq uses ``V̇ ≤ -β||∇V||²``, which for a
1-strongly convex ``V`` gives ``V(z(t)) - V* ≤ e^{-2βt} (V(z(0)) - V*)`` (Polyak–Łojasiewicz): the unique,
globally exponentially stable equilibrium is ``z*(x) = argmin_z V(z; x)``, reached from every start.

The DEQ solves the fixed point of the explicit Euler step of the stable dynamics,

    g(z; x) = z + h F_s(z),    h = ω β / (L (2γ + β)²),   0 < ω < 2,

for which ``||F_s|| ≤ (2γ + β) ||∇V||`` and the descent lemma give
``V(g(z)) ≤ V(z) - h β (1 - ω/2) ||∇V(z)||²``: ``V`` decreases at every fixed-point step, from any start.
Any solver and backward mode of :class:`fedeq.deq.layer.DEQ` applies under a device's budgets.

As with any exact Manek–Kolter projection, ``V`` decides where the dynamics end and the free cell how they
get there: at the exact equilibrium the free cell's parameters get no gradient (``F̃`` vanishes with
``∇V``); they shape the intermediate states that small budgets, phantom gradients and random intermediate
states see.

Orthogonal layer and classifier. ``logits = C (Q z*) + b`` with ``Q ∈ R^{d×d}`` orthogonal (the Cayley map
of an unconstrained parameter, so averaged client parameters still give an orthogonal ``Q``), separate from
the linear classifier ``C``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from fedeq.deq import DEQ, DEQOutput
from fedeq.models.base import DEQParts, ModelOutput, config_value, flattened_size
from fedeq.models.potential_deq import PotentialDEQ
from fedeq.registry import MODELS

Tensor = torch.Tensor
Context = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""``(u, a, c, W, L)`` of a batch: shapes (B, d), (B, k), (B, k), (k, d), (B,)."""

__all__ = ["LyaDEQ", "StableCell"]


class StableCell(nn.Module):
    """``g(z; ctx) = z + h F_s(z)`` (module docstring); holds the free cell's weight ``A``."""

    def __init__(self, hidden: int, gamma: float, beta: float, step_scale: float) -> None:
        super().__init__()
        self.free = nn.Linear(hidden, hidden, bias=False)
        self.gamma, self.beta, self.step_scale = float(gamma), float(beta), float(step_scale)

    def free_field(self, z: Tensor, ctx: Context) -> Tensor:
        """``F(z) = f(z; x) - z``, the free cell's dynamics."""
        return torch.tanh(self.free(z) + ctx[0]) - z

    def stable_field(self, z: Tensor, ctx: Context) -> Tensor:
        """``F_s(z)``, the projected field with ``∇Vᵀ F_s ≤ -β ||∇V||²``."""
        grad = PotentialDEQ.lyapunov_grad(z, ctx)
        gnorm2 = grad.pow(2).sum(dim=1, keepdim=True)
        field = self.free_field(z, ctx)
        field = self.gamma * gnorm2.sqrt() * field / (1.0 + field.norm(dim=1, keepdim=True))
        excess = F.relu((grad * field).sum(dim=1, keepdim=True) + self.beta * gnorm2)
        return field - excess * grad / gnorm2.clamp_min(1e-30)

    def step_size(self, ctx: Context) -> Tensor:
        """``h`` per sample, shape (B, 1)."""
        lip = ctx[4]
        return (self.step_scale * self.beta / (lip * (2 * self.gamma + self.beta) ** 2))[:, None]

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        return z + self.step_size(ctx) * self.stable_field(z, ctx)


class LyaDEQ(nn.Module):
    """Free DEQ cell + Lyapunov stability module + orthogonal layer + classifier (module docstring).

    Args:
        in_features, num_classes: input size and number of classes.
        hidden: state width ``d``.
        icnn_width: number ``k`` of convex units in ``V`` (default ``hidden``).
        a_max: bound on their amplitudes (``L ≤ 1 + a_max/4``).
        gamma: the free field's gain ``γ``; beta: the decay rate ``β``; step_scale: ``ω ∈ (0, 2)``.
        **deq_settings: fields of :class:`fedeq.deq.layer.DEQSettings` (solver, budgets, backward mode, ...).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        icnn_width: int | None = None,
        a_max: float = 2.0,
        gamma: float = 0.5,
        beta: float = 1.0,
        step_scale: float = 1.0,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        if not 0 < step_scale < 2:
            raise ValueError(f"step_scale must be in (0, 2) (got {step_scale!r})")
        if not (a_max > 0 and gamma >= 0 and beta > 0):
            raise ValueError(f"need a_max > 0, gamma >= 0, beta > 0 (got {a_max!r}, {gamma!r}, {beta!r})")
        k = icnn_width or hidden
        self.a_max = float(a_max)
        self.inject = nn.Linear(in_features, hidden)
        self.amp = nn.Linear(hidden, k)
        self.shift = nn.Linear(hidden, k)
        self.ridge = nn.Parameter(torch.randn(k, hidden) / hidden**0.5)
        self.deq = DEQ(StableCell(hidden, gamma, beta, step_scale), **deq_settings)
        self.orth = orthogonal(
            nn.Linear(hidden, hidden, bias=False), orthogonal_map="cayley", use_trivialization=False
        )
        self.head = nn.Linear(hidden, num_classes)

    @property
    def cell(self) -> StableCell:
        return self.deq.func

    def context(self, x: Tensor) -> Context:
        """``(u, a, c, W, L)`` of a batch: the free cell's injection and ``V``'s input-dependent terms."""
        u = self.inject(x.flatten(1))
        a = self.a_max * torch.sigmoid(self.amp(u))
        c = self.shift(u)
        w = self.ridge / torch.linalg.matrix_norm(self.ridge, ord=2).clamp_min(1e-12)
        lip = 1.0 + a.detach().amax(dim=1) / 4.0
        return u, a, c, w, lip

    @staticmethod
    def lyapunov(z: Tensor, ctx: Context) -> Tensor:
        """``V(z; x)`` per sample, shape (B,)."""
        return PotentialDEQ.lyapunov(z, ctx)

    @staticmethod
    def lyapunov_grad(z: Tensor, ctx: Context) -> Tensor:
        """``∇_z V(z; x)``, shape (B, d)."""
        return PotentialDEQ.lyapunov_grad(z, ctx)

    def classify(self, z: Tensor) -> Tensor:
        """``C (Q z) + b``."""
        return self.head(self.orth(z))

    def init_state(self, ctx: Context) -> Tensor:
        return torch.zeros_like(ctx[0])

    def equilibrium(self, x: Tensor, **deq_overrides: Any) -> tuple[DEQOutput, Context]:
        ctx = self.context(x)
        return self.deq(ctx, self.init_state(ctx), **deq_overrides), ctx

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        out, _ = self.equilibrium(x, **deq_overrides)
        return ModelOutput(self.classify(out.z), out)

    def parts(self) -> DEQParts:
        """The equilibrium map as functions (input optimization, random intermediate states)."""
        return DEQParts(self.context, self.deq.func, self.classify, self.init_state, self.deq.settings)


@MODELS.register("lyadeq")
def build_lyadeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory: ``hidden`` from ``cfg`` (default 64)."""
    hidden = int(config_value(cfg, "hidden", 64))
    return LyaDEQ(int(flattened_size(input_shape)), num_classes, hidden=hidden)
