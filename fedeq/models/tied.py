"""Explicit weight-tied models, optionally with a distinct fixed sparse mask per layer.

Following Song, Majumder & Lin ("Revisiting Implicit Models"), the DEQ cell is unrolled an explicit number of
times ``L`` instead of being solved to a fixed point:

    z₀ = tanh(U x + b),      z_{l+1} = tanh((M_l ⊙ W) z_l / √p + U x + b),      l = 0, …, L - 1,

and ``logits = head(z_L)``. ``W``, ``U``, ``b`` and the head are shared by all layers (the only trained
weights). Every layer, the first included, applies its mask to a non-zero state. With density ``p = 1``
every ``M_l`` is all ones (the plain weight-tied model); with ``p < 1`` layer ``l`` applies its own binary
mask ``M_l`` (:mod:`~fedeq.models.masks`: ``unstructured`` entries or ``row`` output units, with an optional
overlap between consecutive layers; overlap 1 is one shared mask). The ``1/√p`` factor keeps the
pre-activation variance of the dense model. Masks are non-persistent buffers, absent from ``state_dict()``,
and rebuilt whenever the persistent buffers ``mask_seed``, ``mask_density``, ``mask_pattern`` and
``mask_overlap`` (``-1`` for independent draws) are loaded, so a federated round sends the shared weights
plus those four scalars. The convolutional model is :mod:`~fedeq.models.tied_conv`.

Budgets (one model serves every device tier):

- ``f_max_iter`` caps the number of unrolled layers: ``L_eff = min(L, f_max_iter)``;
- ``b_max_iter`` caps how many of the last layers are back-propagated through (truncated backpropagation;
  earlier layers run without autograd): ``min(L_eff, b_max_iter)`` layers, or 1 for ``backward="jfb"``.

The statistics follow the DEQ layers': ``nfe = L_eff`` per sample, residual ``||z_L - z_{L-1}||`` (relative:
divided by ``||z_L||``), backward ``nfe`` = layers back-propagated. Solver names, tolerances and backward
modes other than ``jfb`` are accepted and do not change the computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedeq.deq import BackwardStats, DEQOutput, DEQSettings, SolverStats
from fedeq.models.base import ModelOutput, config_value, flattened_size
from fedeq.models.masks import MASK_PATTERNS, MaskSpec, make_layer_masks
from fedeq.registry import MODELS

Tensor = torch.Tensor

_EPS = 1e-12


def make_masks(
    dim: int, depth: int, density: float, pattern: str, seed: int, overlap: float | None = None
) -> Tensor:
    """``depth`` binary (dim, dim) masks (:func:`~fedeq.models.masks.make_layer_masks`)."""
    return make_layer_masks((dim, dim), depth, MaskSpec(density, pattern, seed, overlap))


class MaskedLayers(nn.Module):
    """The persistent mask scalars of a weight-tied model and the per-layer masks they rebuild.

    Subclasses call :meth:`_init_masks` with the shape of the masked weight and read ``self.masks``
    (``depth × shape``, already scaled by ``1/√p``) and ``self._dense``. They define the injection
    ``u = _inject(x)``, the start ``z₀ = _start(u)``, the layer ``z_{l+1} = _layer(l, z_l, u)`` and ``head``;
    :meth:`forward` unrolls them under the call's budgets.
    """

    depth: int
    settings: DEQSettings
    head: nn.Module

    def _inject(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _start(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _layer(self, layer: int, z: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        """Logits after ``min(depth, f_max_iter)`` layers, back-propagated through the last ``b_max_iter``."""
        s = self.settings.override(**deq_overrides) if deq_overrides else self.settings
        u = self._inject(x)
        layers, n_bwd = layer_budget(self.depth, s)
        z, prev = unroll(self._layer, self._start, u, layers, n_bwd)
        stats = unrolled_stats(z, prev, layers, s)
        bstats = BackwardStats(mode="unrolled", ready=True, nfe=n_bwd) if torch.is_grad_enabled() else None
        return ModelOutput(self.head(z), DEQOutput(z, stats, bstats, s, graph_evals=0))

    def _init_masks(self, shape: tuple[int, ...], spec: MaskSpec) -> None:
        spec.validate()
        self._mask_shape = shape
        self.register_buffer("mask_seed", torch.tensor(int(spec.seed), dtype=torch.int64))
        self.register_buffer("mask_density", torch.tensor(float(spec.density), dtype=torch.float32))
        self.register_buffer(
            "mask_pattern", torch.tensor(MASK_PATTERNS.index(spec.pattern), dtype=torch.int64)
        )
        overlap = -1.0 if spec.overlap is None else float(spec.overlap)
        self.register_buffer("mask_overlap", torch.tensor(overlap, dtype=torch.float32))
        self.register_buffer("masks", torch.ones(self.depth, *shape), persistent=False)
        self.rebuild_masks()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.rebuild_masks())

    @property
    def mask_spec(self) -> tuple[float, str, int]:
        """``(density, pattern, seed)`` as stored in the persistent buffers.

        Aggregating equal values across clients may leave round-off (e.g. ``1.0000000000000002``): the
        density is rounded to 6 decimals and clipped to ``(0, 1]``, the integers are rounded.
        """
        density = min(max(round(float(self.mask_density), 6), 1e-6), 1.0)
        pattern = MASK_PATTERNS[int(round(float(self.mask_pattern)))]
        return density, pattern, int(round(float(self.mask_seed)))

    @property
    def overlap(self) -> float | None:
        """Consecutive-layer overlap (``None``: independent draws), rounded like the density."""
        value = round(float(self.mask_overlap), 6)
        return None if value < 0 else min(value, 1.0)

    @torch.no_grad()
    def rebuild_masks(self) -> None:
        """Regenerate the masks (and the ``1/√p`` scale) from the persistent buffers."""
        density, pattern, seed = self.mask_spec
        self._dense = density >= 1
        spec = MaskSpec(density, pattern, seed, self.overlap)
        masks = make_layer_masks(self._mask_shape, self.depth, spec) / density**0.5
        self.masks = masks.to(device=self.mask_density.device)


def unroll(
    layer: Callable[[int, Tensor, Tensor], Tensor],
    z0: Callable[[Tensor], Tensor],
    u: Tensor,
    layers: int,
    n_bwd: int,
) -> tuple[Tensor, Tensor]:
    """``(z_L, z_{L-1})`` of ``z_{l+1} = layer(l, z_l, u)`` from ``z0(u)``; only the last ``n_bwd`` layers
    (and ``z0`` when ``n_bwd = layers``) are recorded by autograd."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and n_bwd >= layers):
        z = z0(u)
    prev = z
    with torch.no_grad():
        u_nograd = u.detach()
        for index in range(layers - n_bwd):
            prev, z = z, layer(index, z, u_nograd)
    for index in range(layers - n_bwd, layers):
        prev, z = z, layer(index, z, u)
    return z, prev


def unrolled_stats(z: Tensor, prev: Tensor, layers: int, s: DEQSettings) -> SolverStats:
    """Per-sample statistics of an unrolled model in the format of the DEQ solvers."""
    with torch.no_grad():
        zd, pd = z.detach().flatten(1), prev.detach().flatten(1)
        abs_r = (zd - pd).norm(dim=1)
        rel_r = abs_r / (zd.norm(dim=1) + _EPS)
        finite = torch.isfinite(zd).all(dim=1)
        score = rel_r if s.stop_mode == "rel" else abs_r
        return SolverStats(
            nfe=torch.full((z.shape[0],), layers, dtype=torch.int64, device=z.device),
            abs_residual=abs_r,
            rel_residual=rel_r,
            converged=finite & (score <= s.tol),
            diverged=~finite,
            extra={"layers": layers},
        )


def layer_budget(depth: int, s: DEQSettings) -> tuple[int, int]:
    """``(layers run, layers back-propagated)`` under the budgets of ``s`` (module docstring)."""
    layers = min(depth, s.f_max_iter)
    if not torch.is_grad_enabled():
        return layers, 0
    return layers, (1 if s.backward == "jfb" else min(layers, s.b_max_iter))


class TiedMLP(MaskedLayers):
    """Weight-tied unrolled MLP of depth ``L`` with optional distinct sparse masks (module docstring).

    Args:
        in_features, num_classes: input size and number of classes.
        hidden: width ``d``.
        depth: number of unrolled layers ``L``.
        mask_density: fraction ``p ∈ (0, 1]`` of kept entries (1: no masks).
        mask_pattern: ``unstructured`` or ``row``.
        mask_seed: seed of the masks (integer ≥ 0).
        mask_overlap: share of each layer's kept units that the next layer keeps too (``None``: independent
            draws; 1: one shared mask).
        **deq_settings: fields of :class:`fedeq.deq.DEQSettings`; ``f_max_iter``/``b_max_iter`` default to
            ``depth`` (all layers).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        depth: int = 3,
        mask_density: float = 1.0,
        mask_pattern: str = "unstructured",
        mask_seed: int = 0,
        mask_overlap: float | None = None,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (got {depth!r})")
        spec = MaskSpec(mask_density, mask_pattern, mask_seed, mask_overlap).validate()
        self.hidden = hidden
        self.depth = depth
        deq_settings = {"f_max_iter": depth, "b_max_iter": depth, **deq_settings}
        self.settings = DEQSettings().override(**deq_settings).validate()
        self.inject = nn.Linear(in_features, hidden)
        self.weight = nn.Parameter(torch.randn(hidden, hidden) * (1.0 / hidden**0.5))
        self.head = nn.Linear(hidden, num_classes)
        self._init_masks((hidden, hidden), spec)

    def _inject(self, x: Tensor) -> Tensor:
        return self.inject(x.flatten(1))

    def _start(self, u: Tensor) -> Tensor:
        return torch.tanh(u)

    def _layer(self, layer: int, z: Tensor, u: Tensor) -> Tensor:
        w = self.weight if self._dense else self.weight * self.masks[layer].to(self.weight.dtype)
        return torch.tanh(torch.addmm(u, z, w.T))


@MODELS.register("tied")
def build_tied(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory for ``tied`` (dense masks): ``hidden`` and ``depth`` from ``cfg``."""
    return _build(input_shape, num_classes, cfg, sparse=False)


@MODELS.register("tied_sparse")
def build_tied_sparse(
    input_shape: tuple[int, ...], num_classes: int, cfg: Any, mask_overlap: float | None = None
) -> nn.Module:
    """Registry factory for ``tied_sparse``: also ``mask_density``, ``mask_pattern``, ``mask_seed`` from
    ``cfg`` and the option ``mask_overlap`` (``model.kwargs``)."""
    check_kwarg_range("mask_overlap", mask_overlap, 0.0, 1.0)
    return _build(input_shape, num_classes, cfg, sparse=True, mask_overlap=mask_overlap)


def check_kwarg_range(key: str, value: float | None, low: float, high: float) -> None:
    """``ValueError`` naming ``model.kwargs.<key>`` unless ``value`` is ``None`` or a number in
    ``[low, high]``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"model.kwargs.{key} must be a number in [{low:g}, {high:g}] (got {value!r})")


def _build(
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: Any,
    sparse: bool,
    mask_overlap: float | None = None,
) -> nn.Module:
    kwargs: dict[str, Any] = {
        "hidden": int(config_value(cfg, "hidden", 64)),
        "depth": int(config_value(cfg, "depth", 3)),
    }
    if sparse:
        kwargs.update(
            mask_density=float(config_value(cfg, "mask_density", 0.5)),
            mask_pattern=str(config_value(cfg, "mask_pattern", "unstructured")),
            mask_seed=int(config_value(cfg, "mask_seed", 0)),
            mask_overlap=mask_overlap,
        )
    return TiedMLP(int(flattened_size(input_shape)), num_classes, **kwargs)
