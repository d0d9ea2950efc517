"""The backward-mode interface: how a DEQ attaches a gradient to its equilibrium, and its statistics."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fedeq.registry import BACKWARDS

if TYPE_CHECKING:
    from fedeq.deq.layer import DEQSettings
    from fedeq.deq.solvers import SolverStats

Tensor = torch.Tensor


@dataclass
class BackwardStats:
    """Filled in when the gradient is computed (``ready`` turns True)."""

    mode: str
    ready: bool = False
    nfe: int = 0
    """Vector-Jacobian products used by the backward."""
    abs_residual: Tensor | None = None
    rel_residual: Tensor | None = None
    fallback: Tensor | None = None
    """``broyden_reuse``: samples that fell back to the JFB gradient."""
    sample_nfe: Tensor | None = None
    """Per sample, the VJPs of the backward's own solve (``nfe`` adds the batch's largest to the VJPs that
    every sample shares); ``None`` when every sample used ``nfe``."""

    def nfe_per_group(self, valid: Tensor) -> Tensor:
        """``nfe`` as a backward over each group of samples alone would have counted it: the VJPs every
        sample shares plus the group's largest count. ``valid`` (G, n) marks the samples of each of ``G``
        consecutive groups of ``n`` (the flattened batch has ``G·n`` samples); returns ``(G,)`` int64."""
        groups = valid.shape[0]
        if self.sample_nfe is None:
            return torch.full((groups,), self.nfe, dtype=torch.int64)
        shared = self.nfe - int(self.sample_nfe.max())
        per = torch.where(valid, self.sample_nfe.view(valid.shape), 0).amax(dim=1)
        return (per + shared).to(torch.int64).cpu()

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"nfe": float(self.nfe)}
        if self.rel_residual is not None:
            out["rel_residual"] = float(self.rel_residual.mean())
        if self.fallback is not None:
            out["fallback"] = float(self.fallback.float().mean())
        return out


class Backward(abc.ABC):
    """A way to differentiate through ``z* = f(z*)``, registered with ``@BACKWARDS.register("name")``.

    The DEQ solves without gradient, then evaluates ``fz = f(z_in)`` once with a graph at the detached
    equilibrium ``z_in`` and hands both to :meth:`attach`, which returns the output that carries the gradient.
    """

    requires_solver: ClassVar[str | None] = None
    """The forward solver this mode needs (its statistics are reused), or ``None`` for any solver."""
    needs_z_grad: ClassVar[bool] = False
    """Whether ``z_in`` must require grad (the gradient takes vector-Jacobian products in ``z``)."""

    @abc.abstractmethod
    def attach(
        self,
        step: Callable[[Tensor], Tensor],
        z_in: Tensor,
        fz: Tensor,
        forward: SolverStats,
        settings: DEQSettings,
        stats: BackwardStats,
    ) -> tuple[Tensor, int]:
        """Return ``(z_out, graph_evals)``: the equilibrium with its gradient attached and the number of
        evaluations of ``step`` (``z -> f(z, x)``) recorded by autograd, ``fz = step(z_in)`` included.
        ``stats`` is filled in when the gradient is computed."""


class HookBackward(Backward):
    """A mode that returns ``fz`` itself and rewrites the gradient reaching it: :meth:`hook` builds the
    hook that maps ``w = ∂L/∂z*`` to the adjoint ``g`` (registered only when ``fz`` requires grad)."""

    needs_z_grad = True

    def attach(
        self,
        step: Callable[[Tensor], Tensor],
        z_in: Tensor,
        fz: Tensor,
        forward: SolverStats,
        settings: DEQSettings,
        stats: BackwardStats,
    ) -> tuple[Tensor, int]:
        if fz.requires_grad:
            fz.register_hook(self.hook(z_in, fz, forward, settings, stats))
        return fz, 1

    @abc.abstractmethod
    def hook(
        self, z_in: Tensor, fz: Tensor, forward: SolverStats, settings: DEQSettings, stats: BackwardStats
    ) -> Callable[[Tensor], Tensor]:
        """The gradient hook of ``fz``; it fills in ``stats`` when it runs."""


def get_backward(name: str) -> type[Backward]:
    """The backward mode registered as ``name``; ``ValueError`` listing the allowed ones otherwise."""
    try:
        return BACKWARDS.get(name)
    except ValueError:
        raise ValueError(f"backward must be one of {', '.join(BACKWARDS.names())} (got {name!r})") from None


def required_solver(name: str) -> str | None:
    """The forward solver that backward mode ``name`` needs (``None``: any); unknown names raise."""
    return get_backward(name).requires_solver


def check_backward_solver(backward: str, solver: str) -> None:
    """Raise ``ValueError`` when backward mode ``backward`` cannot follow forward solver ``solver``."""
    need = required_solver(backward)
    if need is not None and solver != need:
        usable = [n for n in BACKWARDS.names() if required_solver(n) in (None, solver)]
        raise ValueError(
            f"backward {backward!r} needs solver {need!r} (got solver {solver!r}); "
            f"allowed backward modes for other solvers: {', '.join(usable)}"
        )
