"""Inverse problems on images with a generative (decoder) DEQ, solved over its latent code with JIIO.

The decoder maps a code ``c ∈ R^k`` to an image through an equilibrium::

    z* = tanh(W z* + U c + b)    (||W||₂ = γ < 1),        x̂(c) = σ(V z* + d).

Training (fedeq's variant, not the paper's): :func:`train_decoder` trains it as the decoder of an
autoencoder with a linear encoder ``c = E x``. The paper instead trains the generator with JIIO itself
(each batch's latent codes are found by the joint iteration, then the decoder is updated at them); that
training is not implemented here.

Inference (as in the paper): an observation ``y = M ⊙ (x + σ·n)`` is explained by the code solving::

    min_c  ℓ(z*, c) = ½ ||M ⊙ (σ(V z* + d) - y)||² + ½ μ ||c||²,    z* = f(z*, c),

which :func:`fedeq.robust.jiio.jiio` solves jointly with the equilibrium and
:func:`fedeq.robust.naive.naive_input_optimization` solves with a full DEQ solve per gradient step. The tasks
of :func:`make_observation`: ``random`` (a random share of the pixels missing), ``block`` (block inpainting:
a square block of each image missing) and ``denoise`` (every pixel observed, with Gaussian noise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedeq.models.mlp_deq import MLPDEQ
from fedeq.models.parts import DEQParts, deq_parts
from fedeq.robust.input_problem import InputProblem

Tensor = torch.Tensor

__all__ = ["OBSERVATION_TASKS", "DEQDecoder", "inpainting_problem", "make_observation", "train_decoder"]


class DEQDecoder(nn.Module):
    """``c ↦ x̂ = σ(V z* + d)`` with ``z* = tanh(W z* + U c + b)``
    (an :class:`~fedeq.models.mlp_deq.MLPDEQ` core)."""

    def __init__(
        self,
        code_dim: int,
        out_shape: tuple[int, ...],
        hidden: int = 64,
        contraction: float = 0.8,
        **deq_settings: Any,
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.core = MLPDEQ(code_dim, math.prod(self.out_shape), hidden, contraction, **deq_settings)

    def forward(self, c: Tensor, **deq_overrides: Any) -> Tensor:
        logits = self.core(c, **deq_overrides).logits
        return torch.sigmoid(logits).reshape(c.shape[0], *self.out_shape)

    def parts(self) -> DEQParts:
        """The equilibrium map over the code; ``readout`` returns images (not logits)."""
        p = deq_parts(self.core)
        head = p.readout
        shape = self.out_shape
        return DEQParts(
            inject=p.inject,
            cell=p.cell,
            readout=lambda z: torch.sigmoid(head(z)).reshape(z.shape[0], *shape),
            z0=p.z0,
            settings=p.settings,
        )


def train_decoder(
    x: Tensor,
    code_dim: int = 16,
    hidden: int = 64,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    **deq_settings: Any,
) -> tuple[DEQDecoder, nn.Linear]:
    """Train ``decoder(E x) ≈ x`` as an autoencoder (binary cross-entropy on pixels in [0, 1]); returns
    (decoder, encoder E). fedeq's variant: the paper trains the generator with JIIO over latent codes."""
    torch.manual_seed(seed)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    enc = nn.Linear(flat.shape[1], code_dim)
    dec = DEQDecoder(code_dim, tuple(x.shape[1:]), hidden=hidden, **deq_settings)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    dec.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            xb = x[order[i : i + batch_size]]
            xh = dec(enc(xb.reshape(xb.shape[0], -1)))
            loss = F.binary_cross_entropy(xh.clamp(1e-6, 1 - 1e-6), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    dec.eval()
    return dec, enc


OBSERVATION_TASKS: tuple[str, ...] = ("random", "block", "denoise")
"""What :func:`make_observation` can hide: random pixels, a square block, or nothing (noise only)."""


def make_observation(
    x: Tensor,
    missing: float = 0.5,
    noise: float = 0.1,
    seed: int = 0,
    task: str = "random",
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(y, M)`` with ``y = M ⊙ (x + noise·n)`` for images ``x`` of shape (B, C, H, W) (or (B, d) for
    ``random``/``denoise``).

    ``random``: each pixel missing with probability ``missing``; ``block``: a ``block × block`` square
    (default half the side) at a random position per image is missing; ``denoise``: ``M = 1``.
    """
    if task not in OBSERVATION_TASKS:
        raise ValueError(f"task must be one of {', '.join(OBSERVATION_TASKS)} (got {task!r})")
    gen = torch.Generator().manual_seed(seed)
    if task == "random":
        mask = (torch.rand(x.shape, generator=gen) >= missing).to(x.dtype)
    elif task == "denoise":
        mask = torch.ones_like(x)
    else:
        if x.dim() != 4:
            raise ValueError(f"block inpainting needs images of shape (B, C, H, W) (got {tuple(x.shape)})")
        h, w = x.shape[-2:]
        k = block or max(1, min(h, w) // 2)
        mask = torch.ones_like(x)
        rows = torch.randint(0, h - k + 1, (x.shape[0],), generator=gen)
        cols = torch.randint(0, w - k + 1, (x.shape[0],), generator=gen)
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            mask[i, :, r : r + k, c : c + k] = 0
    y = mask * (x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    return y, mask


def inpainting_problem(decoder: DEQDecoder, y: Tensor, mask: Tensor, mu: float = 1e-2) -> InputProblem:
    """The code-space input problem ``½||M ⊙ (x̂(c) - y)||² + ½μ||c||²`` (module docstring)."""
    p = decoder.parts()

    def objective(z: Tensor, c: Tensor) -> Tensor:
        r = mask * (p.readout(z) - y)
        return 0.5 * r.flatten(1).pow(2).sum(dim=1) + 0.5 * mu * c.pow(2).sum(dim=1)

    return InputProblem(p.f, objective, lambda c: p.z0(p.inject(c)))
