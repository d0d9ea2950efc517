"""Quality, cost and training accuracy of the DEQ backward modes on a small MLP-DEQ (digits).

For each mode in :data:`MODES` (``jfb``, ``broyden_reuse`` with its options, ``ift`` with two budgets), on
the same Broyden forward and the same weights:

- ``cos``, ``rel_err``: cosine and relative error ``||g - g*|| / ||g*||`` of the gradient of the DEQ's
  parameters (injection and cell weight; the head's gradient is exact in every mode) against the exact
  gradient ``g*``, whose adjoint ``(I - J_f)^{-T} w`` is a dense solve per sample. Measured on a batch of
  test images at the weights reached after ``--pre-epochs`` epochs of ``ift`` training (mean over seeds).
- ``fallback``: share of samples whose ``broyden_reuse`` estimate fell back to ``w`` (JFB).
- ``vjp``: vector-Jacobian products of the forward (the OPA updates) and of the backward (mean over seeds).
- ``fwd_ms``, ``bwd_ms``: median CPU time (one thread) of the forward (model call and loss) and of
  ``loss.backward()`` on that batch.
- ``acc``: test accuracy after ``--epochs`` epochs of central training from scratch with that mode
  (Adam, lr 0.01, batch 32), mean ± standard deviation over ``--seeds`` seeds.

Example::

    python simulations/benchmarks/backward_quality.py                 # 5 seeds, ~4 min on 2 cores
    python simulations/benchmarks/backward_quality.py --seeds 2 --epochs 1 --quick
    python simulations/benchmarks/backward_quality.py --only jfb --only "reuse + OPA (every 5)"
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedeq.data import load_dataset, to_tensors
from fedeq.models import MLPDEQ
from fedeq.train import evaluate, train_local

Tensor = torch.Tensor

FORWARD = {"solver": "broyden", "f_max_iter": 20, "tol": 1e-4}
"""The forward of every mode: Broyden, 20 evaluations, relative tolerance 1e-4."""

INF = float("inf")
MODES: dict[str, dict[str, Any]] = {
    "jfb": {"backward": "jfb"},
    "reuse": {"backward": "broyden_reuse"},
    "reuse, no fallback": {"backward": "broyden_reuse", "reuse_threshold": INF},
    "reuse + 2 updates (adjoint)": {"backward": "broyden_reuse", "reuse_updates": 2},
    "reuse + 2 updates (adjoint), no fallback": {
        "backward": "broyden_reuse",
        "reuse_updates": 2,
        "reuse_threshold": INF,
    },
    "reuse + 2 updates (outer)": {
        "backward": "broyden_reuse",
        "reuse_updates": 2,
        "reuse_direction": "outer",
    },
    "reuse + 2 updates (outer), no fallback": {
        "backward": "broyden_reuse",
        "reuse_updates": 2,
        "reuse_direction": "outer",
        "reuse_threshold": INF,
    },
    "reuse + OPA (every 5)": {"backward": "broyden_reuse", "reuse_opa_every": 5},
    "reuse + OPA (every 5), no fallback": {
        "backward": "broyden_reuse",
        "reuse_opa_every": 5,
        "reuse_threshold": INF,
    },
    "reuse + OPA (every 2), no fallback": {
        "backward": "broyden_reuse",
        "reuse_opa_every": 2,
        "reuse_threshold": INF,
    },
    "reuse + refine 5": {"backward": "broyden_reuse", "reuse_refine_iter": 5},
    "ift, 5 iterations": {"backward": "ift", "b_max_iter": 5},
    "ift, 20 iterations": {"backward": "ift", "b_max_iter": 20},
}
"""Row label -> DEQ settings on top of :data:`FORWARD` (``ift`` solves with Anderson, the default for a
Broyden forward). The OPA rows make SHINE's outer-problem-aware updates in the forward solve (the model
receives the targets, as ``train_local`` passes them)."""


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fedeq's digits split (scaled to [0, 1], stratified 80/20, seed 0), flattened to 64 features."""
    sp = load_dataset("digits")
    xtr, ytr = to_tensors(sp.x_train.reshape(len(sp.x_train), -1), sp.y_train, torch.device("cpu"))
    xte, yte = to_tensors(sp.x_test.reshape(len(sp.x_test), -1), sp.y_test, torch.device("cpu"))
    return xtr, ytr, xte, yte


def make_model(seed: int, hidden: int, settings: dict[str, Any]) -> MLPDEQ:
    torch.manual_seed(seed)
    return MLPDEQ(64, 10, hidden=hidden, **FORWARD, **settings)


def deq_params(model: MLPDEQ) -> list[Tensor]:
    """The parameters upstream of the equilibrium (the head's gradient does not involve the adjoint)."""
    return [p for name, p in model.named_parameters() if not name.startswith("head.")]


def exact_grad(model: MLPDEQ, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the DEQ parameters with the adjoint from a dense solve of ``(I - J_f)ᵀ a = w``."""
    c = model.injection(x)
    with torch.no_grad():
        z = model.deq(c, model.init_state(c)).z
    z_in = z.detach().requires_grad_(True)
    fz = model.cell(z_in, c)
    z_out = fz.detach().requires_grad_(True)
    (w,) = torch.autograd.grad(F.cross_entropy(model.readout(z_out), y), [z_out])
    b, d = w.shape
    eye = torch.eye(d, dtype=w.dtype)[:, None].expand(d, b, d)
    (jac_t,) = torch.autograd.grad(fz, z_in, eye, retain_graph=True, is_grads_batched=True)  # (d, b, d)
    jac = jac_t.permute(1, 0, 2)  # jac[s, i, j] = ∂f_i/∂z_j of sample s
    adjoint = torch.linalg.solve(torch.eye(d, dtype=w.dtype) - jac.mT, w.unsqueeze(-1)).squeeze(-1)
    grads = torch.autograd.grad(fz, deq_params(model), adjoint)
    return torch.cat([g.flatten() for g in grads])


def mode_grad(
    model: MLPDEQ, x: Tensor, y: Tensor, settings: dict[str, Any]
) -> tuple[Tensor, float, float, Any]:
    """The mode's gradient of the DEQ parameters, the times of the forward (model and loss) and of
    ``loss.backward()``, and the DEQ output."""
    model.zero_grad(set_to_none=True)
    t0 = time.process_time()  # CPU time of this process (one thread): robust to a busy machine
    out = model(x, targets=y, **settings)  # the targets serve only the OPA rows
    loss = F.cross_entropy(out.logits, y)
    t1 = time.process_time()
    loss.backward()
    t2 = time.process_time()
    grad = torch.cat([p.grad.flatten() for p in deq_params(model)])
    return grad, t1 - t0, t2 - t1, out.deq


def quality(args: argparse.Namespace, seed: int, data: tuple[Tensor, ...]) -> dict[str, dict[str, float]]:
    """Gradient quality and backward time of every mode at the weights of a short ``ift`` training."""
    xtr, ytr, xte, yte = data
    model = make_model(seed, args.hidden, {"backward": "ift"})
    if args.pre_epochs:
        train_local(model, xtr, ytr, epochs=args.pre_epochs, lr=0.01, batch_size=32, seed=seed)
    model.eval()  # fixed weights: the spectral rescaling's power iteration does not move between calls
    x, y = xte[: args.batch], yte[: args.batch]
    exact = exact_grad(model, x, y)
    rows: dict[str, dict[str, float]] = {}
    for label in args.modes:
        settings = MODES[label]
        grad, _, _, out = mode_grad(model, x, y, settings)
        times = [mode_grad(model, x, y, settings)[1:3] for _ in range(args.repeats)]
        fb = out.backward.fallback
        rows[label] = {
            "cos": float(F.cosine_similarity(grad, exact, dim=0)),
            "rel_err": float((grad - exact).norm() / exact.norm()),
            "fallback": float(fb.float().mean()) if fb is not None else float("nan"),
            "vjp": float(out.backward.nfe),
            "fwd_vjp": float(out.forward.vjps),
            "fwd_ms": statistics.median(t[0] for t in times) * 1e3,
            "bwd_ms": statistics.median(t[1] for t in times) * 1e3,
        }
    return rows


def accuracy(
    args: argparse.Namespace, seed: int, data: tuple[Tensor, ...], settings: dict[str, Any]
) -> float:
    """Test accuracy (%) after ``args.epochs`` epochs of training from scratch with ``settings``."""
    xtr, ytr, xte, yte = data
    model = make_model(seed, args.hidden, settings)
    train_local(model, xtr, ytr, epochs=args.epochs, lr=0.01, batch_size=32, seed=seed)
    return evaluate(model, xte, yte).accuracy * 100


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the accuracy training")
    p.add_argument("--pre-epochs", type=int, default=1, help="ift epochs before the gradient comparison")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15, help="timed backward passes per mode and seed")
    p.add_argument("--quick", action="store_true", help="skip the accuracy training")
    p.add_argument(
        "--only", action="append", default=None, metavar="LABEL", help="run only this row (repeatable)"
    )
    args = p.parse_args(argv)
    args.modes = args.only or list(MODES)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows: {', '.join(MODES)}")
    torch.set_num_threads(1)
    data = digits()
    per_seed = [quality(args, seed, data) for seed in range(args.seeds)]
    acc: dict[str, list[float]] = {label: [] for label in args.modes}
    if not args.quick:
        for seed in range(args.seeds):
            for label in args.modes:
                acc[label].append(accuracy(args, seed, data, MODES[label]))
    head = (
        "| mode | vjp (fwd + bwd) | cos | rel err | fallback | forward ms | backward ms "
        f"| accuracy % ({args.seeds} seeds) |"
    )
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in args.modes:
        m = {k: float(np.mean([r[label][k] for r in per_seed])) for k in per_seed[0][label]}
        fb = "-" if np.isnan(m["fallback"]) else f"{m['fallback'] * 100:.0f}%"
        a = f"{np.mean(acc[label]):.2f} ± {np.std(acc[label], ddof=1):.2f}" if len(acc[label]) > 1 else "-"
        print(
            f"| {label} | {m['fwd_vjp']:.1f} + {m['vjp']:.1f} | {m['cos']:.4f} | {m['rel_err']:.4f} | {fb} | "
            f"{m['fwd_ms']:.2f} | {m['bwd_ms']:.2f} | {a} |"
        )


if __name__ == "__main__":
    main()
