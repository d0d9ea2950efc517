"""DEQ classifiers and an explicit baseline, all with per-call solver budgets.

Every model's ``forward(x, **deq_overrides)`` returns a :class:`ModelOutput`; the overrides (``f_max_iter``,
``b_max_iter``, ``solver``, ``backward``, ...) reach the DEQ layer, so one set of weights serves devices with
different budgets. Explicit models accept and ignore them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq.layer import DEQ, DEQOutput

Tensor = torch.Tensor


@dataclass
class ModelOutput:
    logits: Tensor
    deq: DEQOutput | None = None
    """Solver statistics of the DEQ layer (``None`` for explicit models)."""

    @property
    def aux_loss(self) -> Tensor | None:
        """Jacobian regularization term when requested, else ``None``."""
        return None if self.deq is None else self.deq.jac_loss


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what one federated round sends per direction)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _SpectralScale(nn.Module):
    """``γ · W / σ_max(W)`` with one power-iteration step per training forward (persistent vector).

    The scaled matrix is computed once per model call, not per solver iteration, so the map the solver
    sees is fixed during a solve.
    """

    def __init__(self, dim: int, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("u", F.normalize(torch.randn(dim), dim=0))

    @torch.no_grad()
    def warm_up(self, w: Tensor, steps: int = 30) -> None:
        """Run power iterations so the estimate is accurate from the first call."""
        for _ in range(steps):
            self.u.copy_(F.normalize(w @ F.normalize(w.T @ self.u, dim=0), dim=0))

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            v = F.normalize(w.T @ self.u, dim=0)
            u = F.normalize(w @ v, dim=0)
            if self.training:
                self.u.copy_(u)
        sigma = u @ w @ v
        return w * (self.gamma / sigma.clamp_min(1e-12))


class TanhCell(nn.Module):
    """``f(z, (u, W)) = tanh(z Wᵀ + u)``; a contraction when ``||W||₂ < 1`` since ``|tanh'| ≤ 1``."""

    def forward(self, z: Tensor, ctx: tuple[Tensor, Tensor]) -> Tensor:
        u, w = ctx
        return torch.tanh(torch.addmm(u, z, w.T))


class MLPDEQ(nn.Module):
    """DEQ for flattened inputs: ``z* = tanh(W z* + U x + b)``, logits ``= head(z*)``.

    With ``contraction = γ < 1`` the weight is rescaled to spectral norm ``γ``, so the fixed point is unique
    and every solver converges; accuracy then does not drop as the evaluation budget grows.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        contraction: float | None = 0.9,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        if contraction is not None and not 0 < contraction < 1:
            raise ValueError(f"contraction must be in (0, 1) or None (got {contraction!r})")
        self.hidden = hidden
        self.inject = nn.Linear(in_features, hidden)
        self.weight = nn.Parameter(torch.randn(hidden, hidden) * (0.5 / hidden**0.5))
        self.scale = _SpectralScale(hidden, contraction) if contraction is not None else None
        if self.scale is not None:
            self.scale.warm_up(self.weight)
        self.deq = DEQ(TanhCell(), **deq_settings)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        x = x.flatten(1)
        u = self.inject(x)
        w = self.scale(self.weight) if self.scale is not None else self.weight
        out = self.deq((u, w), torch.zeros_like(u), **deq_overrides)
        return ModelOutput(self.head(out.z), out)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvCell(nn.Module):
    """Residual conv block with input injection and GroupNorm (MDEQ-style):
    ``f(z, u) = GN(relu(z + GN(conv₂(relu(GN(conv₁ z))) + u)))``."""

    def __init__(self, channels: int, hidden_mult: int = 1) -> None:
        super().__init__()
        inner = channels * hidden_mult
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(_groups(inner), inner, affine=True)
        self.gn2 = nn.GroupNorm(_groups(channels), channels, affine=True)
        self.gn3 = nn.GroupNorm(_groups(channels), channels, affine=True)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = F.relu(self.gn1(self.conv1(z)))
        y = self.gn2(self.conv2(y) + u)
        return self.gn3(F.relu(z + y))


class ConvDEQ(nn.Module):
    """Convolutional DEQ classifier for images of any size (8×8, 28×28, 32×32, ...)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 16, **deq_settings: Any) -> None:
        super().__init__()
        self.inject = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
        )
        self.deq = DEQ(ConvCell(channels), **deq_settings)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        u = self.inject(x)
        out = self.deq(u, torch.zeros_like(u), **deq_overrides)
        return ModelOutput(self.head(out.z.mean(dim=(2, 3))), out)


class ExplicitMLP(nn.Module):
    """Explicit baseline: ``depth`` stacked, non-tied blocks ``z ← tanh(W_l z + U x + b_l)``, ``z₀ = 0``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (got {depth!r})")
        self.inject = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=True) for _ in range(depth))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, **_: Any) -> ModelOutput:
        u = self.inject(x.flatten(1))
        z = torch.zeros_like(u)
        for layer in self.layers:
            z = torch.tanh(layer(z) + u)
        return ModelOutput(self.head(z))


ModelFactory = Callable[..., nn.Module]


def _mlp_deq(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    return MLPDEQ(_prod(input_shape), num_classes, hidden=_get(cfg, "hidden", 64), **deq)


def _conv_deq(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    return ConvDEQ(input_shape[0], num_classes, channels=_get(cfg, "channels", 16), **deq)


def _explicit(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    return ExplicitMLP(
        _prod(input_shape), num_classes, hidden=_get(cfg, "hidden", 64), depth=_get(cfg, "depth", 3)
    )


def _mondeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    from fedeq.models.mondeq import build_mondeq

    return build_mondeq(input_shape, num_classes, cfg, deq)


def _conv_mondeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    from fedeq.models.mondeq import build_conv_mondeq

    return build_conv_mondeq(input_shape, num_classes, cfg, deq)


def _tied(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    from fedeq.models.tied import build_tied

    return build_tied(input_shape, num_classes, cfg, deq)


def _tied_sparse(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    from fedeq.models.tied import build_tied_sparse

    return build_tied_sparse(input_shape, num_classes, cfg, deq)


def _lyadeq(input_shape: tuple[int, ...], num_classes: int, cfg: Any, deq: dict[str, Any]) -> nn.Module:
    from fedeq.models.lyadeq import build_lyadeq

    return build_lyadeq(input_shape, num_classes, cfg, deq)


MODELS: dict[str, Callable[[tuple[int, ...], int, Any, dict[str, Any]], nn.Module]] = {
    "mlp_deq": _mlp_deq,
    "conv_deq": _conv_deq,
    "explicit": _explicit,
    "mondeq": _mondeq,
    "conv_mondeq": _conv_mondeq,
    "tied": _tied,
    "tied_sparse": _tied_sparse,
    "lyadeq": _lyadeq,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, cfg: Any = None, **deq_settings: Any
) -> nn.Module:
    """Build a registered model by name; ``cfg`` is any object with the model's size attributes."""
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {', '.join(MODELS)} (got {name!r})")
    return MODELS[name](tuple(input_shape), num_classes, cfg, deq_settings)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _get(cfg: Any, key: str, default: Any) -> Any:
    return default if cfg is None else getattr(cfg, key, default)
