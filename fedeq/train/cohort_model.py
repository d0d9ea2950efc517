"""Many clients' copies of one model, stacked along a leading client dimension and evaluated with ``vmap``.

A cohort of ``C`` clients keeps every parameter and buffer of the model as one tensor of shape
``(C, *shape)``; client ``c``'s weights are row ``c``. The model's parts run once for all clients with
``torch.func.vmap`` over ``torch.func.functional_call`` (the usual model-ensembling pattern), so each
part sees one client's weights and its ``(B, ...)`` batch, exactly as in a per-client call.

The fixed-point solve is the exception: its loop has data-dependent control flow (per-sample stopping,
host-side convergence checks), which ``vmap`` cannot trace. So only the cell is vectorized: the solver
runs once, outside ``vmap``, on the ``C·B`` samples of all clients flattened into one batch, and each of its
evaluations calls the vectorized cell. Every solver tracks convergence per sample and every backward mode
solves per sample, so each client's samples follow exactly the iterations they follow alone.

Which models vectorize: a :class:`~fedeq.models.classifier.DEQClassifier` (its injection, initial state,
cell and readout are vectorized; the one DEQ layer ``model.deq`` is solved as above) and a model without
any DEQ layer (its whole ``forward`` is vectorized). Either must declare ``supports_cohorts = True``
(``DEQClassifier`` and the explicit baseline do): the parts must be functions of their inputs, weights
and buffers only (no random draws, no ``.item()``, no data-dependent Python branches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedeq.deq import DEQ
from fedeq.deq.layer import equilibrium
from fedeq.models.base import ModelOutput
from fedeq.models.classifier import DEQClassifier

Tensor = torch.Tensor

__all__ = ["StackedModel", "cohort_support_problem"]


def cohort_support_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained as a cohort (one line), or ``None`` when it can."""
    name = type(model).__name__
    if not getattr(model, "supports_cohorts", False):
        return f"model {name} does not declare supports_cohorts = True"
    layers = [m for m in model.modules() if isinstance(m, DEQ)]
    if isinstance(model, DEQClassifier):
        if layers != [model.deq]:
            return f"model {name} has DEQ layers besides its own deq"
    elif layers:
        return f"model {name} has a DEQ layer but is not a DEQClassifier"
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return f"model {name} uses {type(m).__name__} (batch statistics or random draws)"
    return None


class _Part(nn.Module):
    """Calls one method of the wrapped model, so ``functional_call`` can run any part of it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args: Any) -> Any:
        if method == "logits":
            return self.model(*args).logits
        return getattr(self.model, method)(*args)


class StackedModel:
    """``C`` clients' weights for one model, each client's row starting from its own ``states[c]``.

    ``params`` (leaf tensors that require grad) and ``buffers`` are keyed by the model's own names. The
    model object only provides the code; its own weights are not used or changed.
    """

    def __init__(
        self, model: nn.Module, states: Sequence[Mapping[str, Tensor]], device: torch.device
    ) -> None:
        problem = cohort_support_problem(model)
        if problem is not None:
            raise ValueError(problem)
        self.model = model
        self.part = _Part(model)
        self.num_clients = len(states)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.params: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        dtype = next(iter(model.parameters())).dtype
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            rows = [s[name] if name in s else tensor.detach() for s in states]
            stacked = torch.stack([r.to(device=device, dtype=tensor.dtype) for r in rows])
            if name in trainable:
                self.params[name] = stacked.to(dtype).requires_grad_(True)
            else:
                self.buffers[name] = stacked

    def train(self, mode: bool = True) -> StackedModel:
        self.model.train(mode)
        return self

    def state_dict(self, client: int) -> dict[str, Tensor]:
        """Client ``client``'s weights in the order of the model's own ``state_dict`` (detached copies)."""
        own = {**self.params, **self.buffers}
        return {name: own[name][client].detach().clone() for name in self.model.state_dict()}

    def forward(self, x: Tensor, rows: Tensor | None = None, **deq_overrides: Any) -> ModelOutput:
        """The outputs of clients ``rows`` (all when ``None``) on their batches ``x``, shaped ``(A, B, ...)``.

        ``logits`` has shape ``(A, B, K)``. For a DEQ the statistics (``deq``) are per sample over the
        ``A·B`` flattened samples, client-major. Buffers that the model updates in place (running
        estimates) are written back to the clients' rows.
        """
        params = self.params if rows is None else {k: v[rows] for k, v in self.params.items()}
        buffers = self.buffers if rows is None else {k: v[rows] for k, v in self.buffers.items()}
        weights = {f"model.{k}": v for k, v in {**params, **buffers}.items()}
        part = self.part

        def run(method: str, *args: Any) -> Any:
            call = vmap(lambda w, *a: functional_call(part, w, (method, *a)), randomness="error")
            return call(weights, *args)

        try:
            if not isinstance(self.model, DEQClassifier):
                return ModelOutput(run("logits", x))
            return self._deq_forward(run, x, deq_overrides)
        finally:
            if rows is not None and buffers:
                with torch.no_grad():
                    for k, v in buffers.items():
                        self.buffers[k][rows] = v

    def _deq_forward(self, run: Any, x: Tensor, deq_overrides: Mapping[str, Any]) -> ModelOutput:
        model = self.model
        assert isinstance(model, DEQClassifier)
        c = run("injection", x)
        z0 = run("init_state", c)
        shape = z0.shape  # (A, B, ...)

        def cell(z: Tensor, inj: Any) -> Tensor:
            return run("cell", z.reshape(shape), inj).reshape(z.shape)

        settings = model.deq.settings.override(**deq_overrides) if deq_overrides else model.deq.settings
        out = equilibrium(cell, settings, c, z0.flatten(0, 1))
        logits = run("readout", out.z.reshape(shape))
        return ModelOutput(logits, out)
