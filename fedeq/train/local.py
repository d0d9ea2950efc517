"""Local training and evaluation under a solver budget (used centrally, by clients and by the server)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedeq.data.core import batches
from fedeq.deq.layer import DEQ
from fedeq.models.core import ModelOutput
from fedeq.train.optim import make_optimizer

if TYPE_CHECKING:
    from fedeq.train.adversarial import AdversarialConfig

Tensor = torch.Tensor


@dataclass
class TrainStats:
    """What one local training run reports (means are per optimisation step)."""

    num_examples: int
    steps: int
    loss: float
    fp_residual: float
    """Mean relative fixed-point residual the forward solves reached (0 for explicit models)."""
    nfe_fwd: float
    """Mean function evaluations per forward pass (solver + evaluations with autograd)."""
    nfe_bwd: float
    """Mean vector-Jacobian products per backward pass spent on the fixed point."""
    samples_processed: int
    compute_s: float
    """Wall-clock seconds of the training loop."""
    compute_cpu_s: float
    """CPU seconds this process spent in the training loop (all its threads)."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class EvalStats:
    num_examples: int
    loss: float
    accuracy: float
    fp_residual: float
    nfe_fwd: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available; allowed: auto, cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be one of auto, cpu, cuda (got {name!r})")
    return torch.device(name)


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global RNG the model may draw from (CPU, and CUDA when training there).

    Same effect on the CPU as ``torch.manual_seed``, which also queues a seeding of every lazily initialised
    accelerator backend and records a stack trace each time (~0.6 ms per call, a per-client cost here).
    """
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def move_to(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to(device)``, skipped when every parameter and buffer is there already (``Module.to``
    walks the whole module tree, a per-call cost for a client's small model)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device
        device = torch.device("cuda", torch.cuda.current_device())
    if any(t.device != device for t in itertools.chain(model.parameters(), model.buffers())):
        model.to(device)
    return model


def _as_tensors(x: Any, y: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    xt = x if isinstance(x, Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
    yt = y if isinstance(y, Tensor) else torch.from_numpy(np.array(y, dtype=np.int64))
    xt, yt = xt.to(device), yt.to(device)
    return xt.float(), yt.long()


def _default_budget(model: nn.Module) -> int:
    layer = getattr(model, "deq", None)
    return layer.settings.f_max_iter if isinstance(layer, DEQ) else 1


def _solver_stats(out: ModelOutput) -> tuple[float, float, float]:
    """(rel residual, forward evaluations, backward VJPs) of one call; zeros for explicit models."""
    if out.deq is None:
        return 0.0, 0.0, 0.0
    fs = out.deq.forward
    res = float(fs.rel_residual.mean())
    nfe_f = float(fs.nfe.float().mean()) + out.deq.graph_evals
    bwd = out.deq.backward
    nfe_b = float(bwd.nfe) if bwd is not None and bwd.ready else 0.0
    return res, nfe_f, nfe_b


def train_local(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 32,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    deq: Mapping[str, Any] | None = None,
    jac_reg: float = 0.0,
    jac_reg_samples: int = 1,
    randomize_budget: bool = False,
    proximal_mu: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    adversarial: AdversarialConfig | None = None,
    sim_budget_s: float | None = None,
    sim_cost_s: float = 0.0,
) -> TrainStats:
    """Train ``model`` in place with cross-entropy (+ ``jac_reg``·Jacobian term + FedProx term).

    ``deq`` holds per-call DEQ overrides (``f_max_iter``, ``b_max_iter``, ``solver``, ``backward``, ...).
    With ``randomize_budget`` each step draws its forward budget uniformly from ``1..f_max_iter``, which
    trains the model to be accurate at every budget (anytime). FedProx adds ``μ/2 ||θ - θ_global||²`` with
    ``θ_global`` the weights at entry. ``adversarial`` (a :class:`~fedeq.train.adversarial.AdversarialConfig`)
    swaps the cross-entropy for PGD-AT / TRADES / random-intermediate-state losses; the attack's function
    evaluations are added to ``nfe_fwd`` / ``nfe_bwd``. With ``sim_budget_s`` training stops once the
    simulated compute ``Σ_steps (nfe_fwd + nfe_bwd)·batch·sim_cost_s`` reaches it (a device's deadline).
    """
    if adversarial is not None:
        from fedeq.train.adversarial import adversarial_step

        adversarial.validate()
    device = torch.device(device)
    move_to(model, device).train()
    xt, yt = _as_tensors(x, y, device)
    overrides = dict(deq or {})
    if jac_reg > 0:
        overrides["jac_reg_samples"] = jac_reg_samples
    gen = torch.Generator().manual_seed(seed)
    seed_global_rng(seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    f_budget = overrides.get("f_max_iter") or _default_budget(model)
    t0, c0 = time.perf_counter(), time.process_time()
    totals = np.zeros(4)  # loss, residual, nfe_f, nfe_b
    steps = samples = 0
    sim_used = 0.0
    # One pass over every epoch's batches; each epoch's shuffle is drawn when that epoch begins.
    epoch_batches = (batches(xt, yt, batch_size, shuffle=True, generator=gen) for _ in range(epochs))
    for xb, yb in itertools.chain.from_iterable(epoch_batches):
        call = overrides
        if randomize_budget and f_budget > 1:
            call = {**overrides, "f_max_iter": int(torch.randint(1, f_budget + 1, (1,), generator=gen))}
        if adversarial is None:
            out = model(xb, **call)
            loss = F.cross_entropy(out.logits, yb)
        else:
            adv = adversarial_step(model, xb, yb, adversarial, call, generator=gen)
            out, loss = adv.out, adv.loss
        total = loss
        if jac_reg > 0 and out.aux_loss is not None:
            total = total + jac_reg * out.aux_loss
        if anchor is not None:
            prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
            total = total + 0.5 * proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        res, nf, nb = _solver_stats(out)
        if adversarial is not None:
            nf, nb = nf + adv.nfe_fwd, nb + adv.nfe_bwd
        totals += (float(loss.detach()), res, nf, nb)
        steps += 1
        samples += xb.shape[0]
        sim_used += (nf + nb) * xb.shape[0] * sim_cost_s
        if sim_budget_s is not None and sim_used >= sim_budget_s:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mean = totals / max(steps, 1)
    return TrainStats(
        num_examples=int(xt.shape[0]),
        steps=steps,
        loss=float(mean[0]),
        fp_residual=float(mean[1]),
        nfe_fwd=float(mean[2]),
        nfe_bwd=float(mean[3]),
        samples_processed=samples,
        compute_s=time.perf_counter() - t0,
        compute_cpu_s=time.process_time() - c0,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    **deq_overrides: Any,
) -> EvalStats:
    """Mean cross-entropy, accuracy, residual and forward evaluations on ``(x, y)``."""
    device = torch.device(device)
    move_to(model, device).eval()
    xt, yt = _as_tensors(x, y, device)
    n = int(xt.shape[0])
    if n == 0:
        return EvalStats(0, float("nan"), float("nan"), float("nan"), float("nan"))
    loss = correct = res = nfe = 0.0
    for xb, yb in batches(xt, yt, batch_size):
        out = model(xb, **deq_overrides)
        loss += float(F.cross_entropy(out.logits, yb, reduction="sum"))
        correct += float((out.logits.argmax(dim=1) == yb).sum())
        r, nf, _ = _solver_stats(out)
        res += r * xb.shape[0]
        nfe += nf * xb.shape[0]
    return EvalStats(n, loss / n, correct / n, res / n, nfe / n)


def accuracy_vs_budget(
    model: nn.Module,
    x: Any,
    y: Any,
    budgets: Sequence[int] = (1, 2, 4, 8, 16, 32),
    *,
    device: torch.device | str = "cpu",
    **deq_overrides: Any,
) -> list[dict[str, float]]:
    """The anytime curve: one row per forward budget with accuracy, loss, residual and evaluations used."""
    rows = []
    for k in budgets:
        st = evaluate(model, x, y, device=device, **{**deq_overrides, "f_max_iter": int(k)})
        rows.append({"budget": int(k), **st.as_dict()})
    return rows
