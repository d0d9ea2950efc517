"""Explicit weight-tied models, optionally with a distinct fixed sparse mask per layer.

Following Song, Majumder & Lin ("Revisiting Implicit Models"), the DEQ cell is unrolled an explicit number of
times ``L`` from ``z₀ = 0`` instead of being solved to a fixed point:

    z_{l+1} = tanh((M_l ⊙ W) z_l / √p + U x + b),      l = 0, …, L - 1,      logits = head(z_L).

``W``, ``U``, ``b`` and the head are shared by all layers (the only trained weights). With density
``p = 1`` every ``M_l`` is all ones (the plain weight-tied model); with ``p < 1`` layer ``l`` applies its own
binary mask ``M_l`` with exactly ``round(p·d²)`` ones (``unstructured``) or ``round(p·d)`` kept rows
(``row``: each layer uses its own subset of output units). The ``1/√p`` factor keeps the pre-activation
variance of the dense model. Masks are drawn from a generator seeded with ``(mask_seed, l)``; they are
non-persistent buffers, absent from ``state_dict()``, and rebuilt whenever the persistent buffers
``mask_seed``, ``mask_density`` and ``mask_pattern`` are loaded, so a federated round sends the shared
weights plus those three scalars.

Budgets (one model serves every device tier):

- ``f_max_iter`` caps the number of unrolled layers: ``L_eff = min(L, f_max_iter)``;
- ``b_max_iter`` caps how many of the last layers are back-propagated through (truncated backpropagation;
  earlier layers run without autograd): ``min(L_eff, b_max_iter)`` layers, or 1 for ``backward="jfb"``.

The statistics follow the DEQ layers': ``nfe = L_eff`` per sample, residual ``||z_L - z_{L-1}||`` (relative:
divided by ``||z_L||``), backward ``nfe`` = layers back-propagated. Solver names, tolerances and backward
modes other than ``jfb`` are accepted and do not change the computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedeq.deq import BackwardStats, DEQOutput, DEQSettings, SolverStats
from fedeq.models.base import ModelOutput, config_value, flattened_size
from fedeq.registry import MODELS

Tensor = torch.Tensor

MASK_PATTERNS: tuple[str, ...] = ("unstructured", "row")
_EPS = 1e-12


def make_masks(dim: int, depth: int, density: float, pattern: str, seed: int) -> Tensor:
    """``depth`` binary (dim, dim) masks; layer ``l`` comes from a generator seeded ``seed·1009 + l``."""
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"mask_pattern must be one of {', '.join(MASK_PATTERNS)} (got {pattern!r})")
    if not 0 < density <= 1:
        raise ValueError(f"mask_density must be in (0, 1] (got {density!r})")
    masks = torch.ones(depth, dim, dim)
    if density >= 1:
        return masks
    for layer in range(depth):
        gen = torch.Generator().manual_seed(int(seed) * 1009 + layer)
        if pattern == "unstructured":
            k = max(1, round(density * dim * dim))
            keep = torch.randperm(dim * dim, generator=gen)[:k]
            flat = torch.zeros(dim * dim)
            flat[keep] = 1.0
            masks[layer] = flat.view(dim, dim)
        else:
            k = max(1, round(density * dim))
            rows = torch.randperm(dim, generator=gen)[:k]
            m = torch.zeros(dim, dim)
            m[rows] = 1.0
            masks[layer] = m
    return masks


class TiedMLP(nn.Module):
    """Weight-tied unrolled MLP of depth ``L`` with optional distinct sparse masks (module docstring).

    Args:
        in_features, num_classes: input size and number of classes.
        hidden: width ``d``.
        depth: number of unrolled layers ``L``.
        mask_density: fraction ``p ∈ (0, 1]`` of kept entries (1: no masks).
        mask_pattern: ``unstructured`` or ``row``.
        mask_seed: seed of the masks (integer ≥ 0).
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
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (got {depth!r})")
        if isinstance(mask_seed, bool) or not isinstance(mask_seed, int) or mask_seed < 0:
            raise ValueError(f"mask_seed must be an integer >= 0 (got {mask_seed!r})")
        make_masks(1, 1, mask_density, mask_pattern, 0)  # validates density and pattern
        self.hidden = hidden
        self.depth = depth
        deq_settings = {"f_max_iter": depth, "b_max_iter": depth, **deq_settings}
        self.settings = DEQSettings().override(**deq_settings).validate()
        self.inject = nn.Linear(in_features, hidden)
        self.weight = nn.Parameter(torch.randn(hidden, hidden) * (1.0 / hidden**0.5))
        self.head = nn.Linear(hidden, num_classes)
        self.register_buffer("mask_seed", torch.tensor(int(mask_seed), dtype=torch.int64))
        self.register_buffer("mask_density", torch.tensor(float(mask_density), dtype=torch.float32))
        self.register_buffer(
            "mask_pattern", torch.tensor(MASK_PATTERNS.index(mask_pattern), dtype=torch.int64)
        )
        self.register_buffer("masks", torch.ones(depth, hidden, hidden), persistent=False)
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

    @torch.no_grad()
    def rebuild_masks(self) -> None:
        """Regenerate the masks (and the ``1/√p`` scale) from the persistent seed, density and pattern."""
        density, pattern, seed = self.mask_spec
        self._dense = density >= 1
        masks = make_masks(self.hidden, self.depth, density, pattern, seed) / density**0.5
        self.masks = masks.to(device=self.weight.device, dtype=self.weight.dtype)

    def _layer(self, layer: int, z: Tensor, u: Tensor) -> Tensor:
        w = self.weight if self._dense else self.weight * self.masks[layer]
        return torch.tanh(torch.addmm(u, z, w.T))

    def forward(self, x: Tensor, **deq_overrides: Any) -> ModelOutput:
        s = self.settings.override(**deq_overrides) if deq_overrides else self.settings
        u = self.inject(x.flatten(1))
        layers = min(self.depth, s.f_max_iter)
        grad = torch.is_grad_enabled()
        n_bwd = (1 if s.backward == "jfb" else min(layers, s.b_max_iter)) if grad else 0
        z = torch.zeros_like(u)
        prev = z
        with torch.no_grad():
            u_nograd = u.detach()
            for layer in range(layers - n_bwd):
                prev, z = z, self._layer(layer, z, u_nograd)
        for layer in range(layers - n_bwd, layers):
            prev, z = z, self._layer(layer, z, u)
        with torch.no_grad():
            zd, pd = z.detach(), prev.detach()
            abs_r = (zd - pd).norm(dim=1)
            rel_r = abs_r / (zd.norm(dim=1) + _EPS)
            finite = torch.isfinite(zd).all(dim=1)
            score = rel_r if s.stop_mode == "rel" else abs_r
            stats = SolverStats(
                nfe=torch.full((u.shape[0],), layers, dtype=torch.int64, device=u.device),
                abs_residual=abs_r,
                rel_residual=rel_r,
                converged=finite & (score <= s.tol),
                diverged=~finite,
                extra={"layers": layers},
            )
        bstats = BackwardStats(mode="unrolled", ready=True, nfe=n_bwd) if grad else None
        return ModelOutput(self.head(z), DEQOutput(z, stats, bstats, s, graph_evals=0))


@MODELS.register("tied")
def build_tied(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory for ``tied`` (dense masks): ``hidden`` and ``depth`` from ``cfg``."""
    return _build(input_shape, num_classes, cfg, sparse=False)


@MODELS.register("tied_sparse")
def build_tied_sparse(input_shape: tuple[int, ...], num_classes: int, cfg: Any) -> nn.Module:
    """Registry factory for ``tied_sparse``: also ``mask_density``, ``mask_pattern``, ``mask_seed``."""
    return _build(input_shape, num_classes, cfg, sparse=True)


def _build(input_shape: tuple[int, ...], num_classes: int, cfg: Any, sparse: bool) -> nn.Module:
    kwargs: dict[str, Any] = {
        "hidden": int(config_value(cfg, "hidden", 64)),
        "depth": int(config_value(cfg, "depth", 3)),
    }
    if sparse:
        kwargs.update(
            mask_density=float(config_value(cfg, "mask_density", 0.5)),
            mask_pattern=str(config_value(cfg, "mask_pattern", "unstructured")),
            mask_seed=int(config_value(cfg, "mask_seed", 0)),
        )
    return TiedMLP(int(flattened_size(input_shape)), num_classes, **kwargs)
