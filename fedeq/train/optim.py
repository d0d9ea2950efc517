"""Lean first-order optimizers for local training: Adam and SGD with momentum.

They apply exactly the updates of ``torch.optim.Adam`` and ``torch.optim.SGD`` (single-tensor form, the one
PyTorch uses for CPU parameters), operation for operation, so training gives bit-identical parameters on
the CPU. What they leave out is ``torch.optim``'s machinery around the update, which matters for a
simulated device process that trains a small DEQ for a few steps per call:

- constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (about 40 MB of memory and half a
  second of CPU in every process that trains, measured with torch 2.13);
- every ``step()`` passes through profiling hooks, dynamo guards and grad-mode wrappers, which cost about as
  much as the update itself for a model of a few tens of thousands of parameters.

Adam (Kingma & Ba), with ``g ← ∇θ + λθ`` when ``weight_decay = λ > 0``:

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
    θ ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

SGD with momentum μ: ``b ← g`` at the first step, ``b ← μ b + g`` afterwards, ``θ ← θ − lr · b``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedeq.config.core import OPTIMIZERS

Tensor = torch.Tensor


class _Optimizer:
    """Parameters with gradients, and ``zero_grad`` as in ``torch.optim`` (``set_to_none`` by default)."""

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params must hold at least one tensor")
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (got {lr})")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 (got {weight_decay})")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def _grads(self) -> Iterable[tuple[int, Tensor, Tensor]]:
        """``(index, parameter, gradient with weight decay)`` of every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            yield i, p, g


class Adam(_Optimizer):
    """Adam with L2 weight decay added to the gradient (``torch.optim.Adam``'s defaults otherwise)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1) (got {betas})")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.steps = [0] * len(self.params)
        self.moments: list[tuple[Tensor, Tensor] | None] = [None] * len(self.params)
        """``(m, v)`` of each parameter, made at its first step."""

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.beta1, self.beta2
        for i, p, g in self._grads():
            moments = self.moments[i]
            if moments is None:
                zeros = [torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(2)]
                moments = self.moments[i] = (zeros[0], zeros[1])
            m, v = moments
            self.steps[i] += 1
            t = self.steps[i]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step_size = self.lr / (1 - b1**t)
            denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


class SGD(_Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum and L2 weight decay."""

    def __init__(
        self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, lr, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1) (got {momentum})")
        self.momentum = float(momentum)
        self.buffers: list[Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p, g in self._grads():
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = g.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


def make_optimizer(name: str, params: Iterable[Tensor], lr: float, weight_decay: float = 0.0) -> Adam | SGD:
    """The optimizer ``train.optimizer`` names: ``adam`` (default betas) or ``sgd`` (momentum 0.9)."""
    if name == "adam":
        return Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")
