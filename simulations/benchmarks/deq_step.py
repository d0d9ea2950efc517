"""Time one DEQ training step (forward + backward) in fedeq, in TorchDEQ and at the physical limit.

All three columns run in one process, on the same ``f`` module with the same weights and data:

- ``fedeq``: ``model(x, **settings)`` then ``loss.backward()`` through :class:`fedeq.deq.DEQ` (IFT hook).
- ``torchdeq``: ``torchdeq.get_deq(core="indexing", ift=True, ...)`` wrapped around the same cell, with the
  same input injection and head before and after it.
- ``limit``: the same number of plain ``f`` evaluations without gradient, one ``f`` with a graph, and the
  same number of vector-Jacobian products (``g ← J_fᵀ g + w``), with no solver bookkeeping at all.
- ``floor`` (Anderson and Broyden): the ``limit`` plus, after each evaluation, only the memory traffic the
  solver's history makes necessary, without its arithmetic: the rows a step stores are written (Anderson:
  the residual and the candidate; Broyden: the residual) and the stored rows a step reads are read once
  each with one ``torch.sum`` (Anderson: the ``2n`` rows of its ``n`` slots, for the Gram row and the mix;
  Broyden: its ``k`` residuals twice, for ``Qᵀ g`` and ``z - Q c``). Nothing is moved at the last
  evaluation of a solve, which only scores. Interleaved with the real ``f``, this is what a step costs on
  this machine when its history does not stay in cache: no implementation that keeps the same history in
  the same precision can be faster than ``floor``.

The tolerance is tiny so both libraries spend their whole budget; a census run (untimed) counts the calls
of ``f`` and the VJPs of each column with hooks and fails if the two libraries differ. TorchDEQ's Broyden
evaluates ``f(z0)`` once before its ``max_iter`` steps, so its budgets are set one lower to spend the same
number of evaluations; its IFT backward also recomputes ``f`` once with a graph (reported in ``f_grad``).

Times are medians over ``--repeats`` steps after ``--warmup`` steps; in each repeat the three columns run
back to back, and the ratio columns are medians of the per-repeat ratios (robust to a drifting machine).

Examples::

    python simulations/benchmarks/deq_step.py                       # full CPU run
    python simulations/benchmarks/deq_step.py --quick --csv out.csv
    python simulations/benchmarks/deq_step.py --device cuda         # 64 channels, 32x32, batch 128
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedeq.data import load_dataset, to_tensors
from fedeq.models import MLPDEQ, ConvDEQ
from fedeq.train import evaluate, resolve_device, train_local

Tensor = torch.Tensor

SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
"""fedeq solver name -> TorchDEQ solver name."""
TINY_TOL = 1e-30
ANDERSON_M = 6  # TorchDEQ's default memory; fedeq is set to the same value


# --------------------------------------------------------------------------------------------- data


def load_digits_tensors(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fedeq's digits split (scaled to [0, 1], stratified 80/20, seed 0), flattened to 64 features."""
    sp = load_dataset("digits")
    xtr, ytr = to_tensors(sp.x_train.reshape(len(sp.x_train), -1), sp.y_train, device)
    xte, yte = to_tensors(sp.x_test.reshape(len(sp.x_test), -1), sp.y_test, device)
    return xtr, ytr, xte, yte


# ------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One model + batch (the model's ``deq.func`` is the cell ``f(z, c)`` all columns share)."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    x: Tensor
    y: Tensor

    def pre(self, model: nn.Module, x: Tensor) -> tuple[Any, Tensor]:
        """The cell's context ``c`` (the model's input injection) and the initial state ``z0``."""
        c = model.injection(x) if hasattr(model, "injection") else model.inject(x)
        return c, (model.init_state(c) if hasattr(model, "init_state") else torch.zeros_like(c))

    def post(self, model: nn.Module, z: Tensor) -> Tensor:
        """The logits of an equilibrium ``z``."""
        return model.readout(z)


def _seeded(cls: type[nn.Module], *args: Any, **kwargs: Any) -> Callable[..., nn.Module]:
    """``build(**deq)``: a fresh ``cls(*args, **kwargs, **deq)`` with the same initial weights every time."""

    def build(**deq: Any) -> nn.Module:
        torch.manual_seed(0)
        return cls(*args, **kwargs, **deq)

    return build


def make_cases(device: torch.device, which: list[str], hidden: int, batch: int) -> list[Case]:
    cases = []
    if "mlp" in which:
        xtr, ytr, _, _ = load_digits_tensors(device)
        x, y = xtr[:batch], ytr[:batch]
        build = _seeded(MLPDEQ, 64, 10, hidden=hidden)
        desc = f"MLPDEQ digits, hidden {hidden}, batch {x.shape[0]}"
        cases.append(Case("mlp", desc, build, x, y))
    if "conv" in which:
        if device.type == "cuda":
            channels, size, cbatch = 64, 32, 128
        else:  # the full size takes seconds per step on a small CPU
            channels, size, cbatch = 16, 16, 32
        g = torch.Generator().manual_seed(0)
        x = torch.randn(cbatch, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 10, (cbatch,), generator=g).to(device)
        build = _seeded(ConvDEQ, 3, 10, channels=channels)
        desc = f"ConvDEQ {channels} ch, {size}x{size}, batch {cbatch} (random data)"
        cases.append(Case("conv", desc, build, x, y))
    return cases


def fedeq_settings(solver: str, iters: int, backward: str = "ift") -> dict[str, Any]:
    s: dict[str, Any] = dict(
        solver=solver,
        b_solver=solver,
        f_max_iter=iters,
        b_max_iter=iters,
        tol=TINY_TOL,
        stop_mode="abs",
        backward=backward,
    )
    if solver == "anderson":
        s["solver_options"] = {"m": ANDERSON_M}
        s["b_solver_options"] = {"m": ANDERSON_M}
    return s


def make_torchdeq(solver: str, iters: int) -> nn.Module:
    import torchdeq

    # TorchDEQ's Broyden calls f(z0) before its max_iter steps: one lower spends the same evaluations.
    budget = iters - 1 if solver == "broyden" else iters
    return torchdeq.get_deq(
        core="indexing",
        ift=True,
        f_solver=SOLVERS[solver],
        b_solver=SOLVERS[solver],
        f_max_iter=budget,
        b_max_iter=budget,
        f_tol=TINY_TOL,
        b_tol=TINY_TOL,
        f_stop_mode="abs",
        b_stop_mode="abs",
    )


# ------------------------------------------------------------------------------------------- steps
# Each step returns a dict filled only when ``info`` is requested (census run): residuals.


def fedeq_step(model: nn.Module, case: Case, info: dict | None = None) -> Callable[[], None]:
    """Forward; returns the backward closure so forward and backward can be timed separately."""
    out = model(case.x)
    loss = F.cross_entropy(out.logits, case.y)

    def backward() -> None:
        loss.backward()
        if info is not None:
            info["res_f"] = float(out.deq.forward.abs_residual.mean())
            bst = out.deq.backward
            info["res_b"] = float(bst.abs_residual.mean()) if bst.abs_residual is not None else float("nan")

    return backward


def torchdeq_step(
    model: nn.Module, tdeq: nn.Module, case: Case, info: dict | None = None
) -> Callable[[], None]:
    ctx, z0 = case.pre(model, case.x)
    cell = model.deq.func
    writer = None
    if info is not None:

        def writer(binfo: dict) -> None:
            info["res_b"] = float(binfo["abs_lowest"].mean())

    z_list, finfo = tdeq(lambda z: cell(z, ctx), z0, backward_writer=writer)
    loss = F.cross_entropy(case.post(model, z_list[-1]), case.y)
    if info is not None:
        info["res_f"] = float(finfo["abs_lowest"].mean())
    return loss.backward


class HistoryTraffic:
    """The memory traffic of a solver's history without its arithmetic (the ``floor`` column).

    Called after every evaluation of a solve of ``iters`` evaluations with its output: stores the rows the
    solver stores and reads the stored rows it reads (see the module docstring). :meth:`start` begins a
    solve (the forward and the backward solve each have their own history).
    """

    def __init__(self, solver: str, like: Tensor, iters: int) -> None:
        self.solver, self.iters = solver, iters
        self.b = like.shape[0]
        self.d = like[0].numel()
        rows = 2 * ANDERSON_M if solver == "anderson" else iters
        self.buf = like.new_empty(rows, self.b, self.d)
        self.k = 0

    def start(self) -> None:
        self.k = 0

    def __call__(self, out: Tensor) -> None:
        k, self.k = self.k, self.k + 1
        if k >= self.iters - 1:  # the last evaluation only scores
            return
        flat = out.detach().reshape(self.b, self.d)
        if self.solver == "anderson":
            slot, n = k % ANDERSON_M, min(k + 1, ANDERSON_M)
            self.buf[2 * slot : 2 * slot + 2].copy_(flat.expand(2, self.b, self.d))
            if n > 1:
                torch.sum(self.buf[: 2 * n])
        else:
            self.buf[k].copy_(flat)
            if k > 0:
                torch.sum(self.buf[:k])
                torch.sum(self.buf[:k])


def limit_step(
    model: nn.Module,
    case: Case,
    nf: int,
    nb: int,
    info: dict | None = None,
    traffic: HistoryTraffic | None = None,
) -> Callable[[], None]:
    """``nf`` plain evaluations, one with a graph, ``nb`` VJPs and the final backward: nothing else but,
    with ``traffic`` (the ``floor`` column), a solver history's memory traffic after each evaluation."""
    ctx, z0 = case.pre(model, case.x)
    cell = model.deq.func
    touch = traffic or (lambda out: None)
    with torch.no_grad():
        z = z0
        if traffic is not None:
            traffic.start()
        for _ in range(nf):
            z = cell(z, ctx)
            touch(z)
    z = z.requires_grad_()
    fz = cell(z, ctx)
    zh = fz.detach().requires_grad_()
    loss = F.cross_entropy(case.post(model, zh), case.y)
    if info is not None:
        info["res_f"] = float((fz - z).detach().flatten(1).norm(dim=1).mean())

    def backward() -> None:
        loss.backward()  # head gradients and w = dL/dz*
        w = zh.grad
        g = w
        if traffic is not None:
            traffic.start()
        for _ in range(nb):
            g_new = torch.autograd.grad(fz, z, g, retain_graph=True)[0] + w
            touch(g_new)
            if info is not None:
                info["res_b"] = float((g_new - g).flatten(1).norm(dim=1).mean())
            g = g_new
        fz.backward(g)

    return backward


# ------------------------------------------------------------------------------------ measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def timed(
    step: Callable[[], Callable[[], None]], model: nn.Module, device: torch.device
) -> tuple[float, float]:
    """(forward ms, backward ms) of one step; gradients are cleared first."""
    model.zero_grad(set_to_none=True)
    _sync(device)
    t0 = _clock()
    backward = step()
    _sync(device)
    t1 = _clock()
    backward()
    _sync(device)
    t2 = _clock()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


class CallCounter:
    """Counts calls of a DEQ's cell without gradient, with a graph, and VJPs through its outputs (census
    only): a forward hook on a cell module, else the cell function wrapped until :meth:`remove`."""

    def __init__(self, deq: nn.Module) -> None:
        self.f_nograd = self.f_grad = self.vjp = 0
        cell = deq.func
        if isinstance(cell, nn.Module):
            self._restore = cell.register_forward_hook(lambda module, args, out: self._count(out)).remove
        else:

            def counted(z: Tensor, c: Any) -> Tensor:
                out = cell(z, c)
                self._count(out)
                return out

            deq.func = counted
            self._restore = lambda: setattr(deq, "func", cell)

    def _count(self, out: Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad:
            self.f_grad += 1
            out.register_hook(self._count_vjp)
        else:
            self.f_nograd += 1

    def _count_vjp(self, grad: Tensor) -> None:
        self.vjp += 1

    def remove(self) -> dict[str, int]:
        self._restore()
        # The last backward pass through the graphed f (into the parameters) is not part of the solve.
        return {"f_nograd": self.f_nograd, "f_grad": self.f_grad, "vjp": self.vjp - 1}


def peak_memory_mb(step: Callable[[], Callable[[], None]], model: nn.Module, device: torch.device) -> float:
    """Peak memory allocated during one step above what was live before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: running sum of the allocations and frees that
    ``torch.profiler`` records (``profile_memory=True``), in time order, at operator granularity.
    """
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


@dataclass
class Row:
    case: str
    solver: str
    times: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    res: dict[str, dict[str, float]] = field(default_factory=dict)
    mem: dict[str, float] = field(default_factory=dict)

    def ms(self, who: str, part: str = "step") -> float:
        idx = {"fwd": [0], "bwd": [1], "step": [0, 1]}[part]
        return statistics.median(sum(t[i] for i in idx) for t in self.times[who])

    def ratio(self, a: str, b: str) -> float:
        """Median over repeats of the step-time ratio (the columns of one repeat run back to back)."""
        return statistics.median(sum(x) / sum(y) for x, y in zip(self.times[a], self.times[b], strict=True))


def census(model: nn.Module, step: Callable[[dict], Callable[[], None]]) -> tuple[dict[str, int], dict]:
    """Counts and residuals of one untimed step: ``step(info)`` runs the forward, its result the backward."""
    counter = CallCounter(model.deq)
    info: dict = {}
    model.zero_grad(set_to_none=True)
    step(info)()
    return counter.remove(), info


def bench_solver(case: Case, solver: str, args: argparse.Namespace, device: torch.device) -> Row:
    model = case.build(**fedeq_settings(solver, args.iters)).to(device).train()
    tdeq = make_torchdeq(solver, args.iters).to(device).train()
    row = Row(case.name, solver)

    # Census: evaluation counts and residuals of each column (untimed).
    libraries = {
        "fedeq": lambda info: fedeq_step(model, case, info),
        "torchdeq": lambda info: torchdeq_step(model, tdeq, case, info),
    }
    for who, step in libraries.items():
        row.counts[who], row.res[who] = census(model, step)
    a, b = row.counts["fedeq"], row.counts["torchdeq"]
    if (a["f_nograd"], a["vjp"]) != (b["f_nograd"], b["vjp"]):
        raise RuntimeError(f"{case.name}/{solver}: evaluation counts differ: fedeq {a}, torchdeq {b}")
    nf, nb = a["f_nograd"], a["vjp"]
    row.counts["limit"], row.res["limit"] = census(model, lambda info: limit_step(model, case, nf, nb, info))

    steps = {
        "fedeq": lambda: fedeq_step(model, case),
        "torchdeq": lambda: torchdeq_step(model, tdeq, case),
        "limit": lambda: limit_step(model, case, nf, nb),
    }
    if solver != "fixed_point":  # fixed-point iteration keeps no history: its floor is the limit
        with torch.no_grad():
            like = case.pre(model, case.x)[1]
        traffic = HistoryTraffic(solver, like, args.iters)
        steps["floor"] = lambda: limit_step(model, case, nf, nb, traffic=traffic)
    for who, step in steps.items():
        if who != "floor":
            row.mem[who] = peak_memory_mb(step, model, device)
    for _ in range(args.warmup):
        for step in steps.values():
            timed(step, model, device)
    row.times = {who: [] for who in steps}
    for _ in range(args.repeats):  # interleaved so drifts of the machine hit all columns alike
        for who, step in steps.items():
            row.times[who].append(timed(step, model, device))
    return row


def bench_reuse(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Backward time of ``broyden_reuse`` vs ``ift`` (same Broyden forward, same weights)."""
    models = {
        bw: case.build(**fedeq_settings("broyden", args.iters, backward=bw)).to(device).train()
        for bw in ("ift", "broyden_reuse")
    }
    for _ in range(args.warmup):
        for m in models.values():
            timed(lambda m=m: fedeq_step(m, case), m, device)
    times: dict[str, list[tuple[float, float]]] = {bw: [] for bw in models}
    for _ in range(args.repeats):
        for bw, m in models.items():
            times[bw].append(timed(lambda m=m: fedeq_step(m, case), m, device))
    med = {
        bw: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for bw, ts in times.items()
    }
    return {
        "ift_fwd_ms": med["ift"][0],
        "ift_bwd_ms": med["ift"][1],
        "reuse_fwd_ms": med["broyden_reuse"][0],
        "reuse_bwd_ms": med["broyden_reuse"][1],
        "bwd_ratio": med["broyden_reuse"][1] / med["ift"][1],
    }


def reuse_accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Test accuracy of a short central MLPDEQ training on digits with each backward (mean over seeds)."""
    xtr, ytr, xte, yte = load_digits_tensors(device)
    acc: dict[str, list[float]] = {"ift": [], "broyden_reuse": []}
    for seed in range(args.seeds):
        for bw in acc:
            torch.manual_seed(seed)
            model = MLPDEQ(
                64,
                10,
                hidden=args.hidden,
                solver="broyden",
                f_max_iter=args.iters,
                b_max_iter=args.iters,
                tol=1e-4,
                backward=bw,
            )
            train_local(model, xtr, ytr, epochs=args.epochs, lr=0.01, batch_size=32, seed=seed, device=device)
            acc[bw].append(evaluate(model, xte, yte, device=device).accuracy)
    gaps = np.subtract(acc["ift"], acc["broyden_reuse"]) * 100
    sem = float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else float("nan")
    return {bw: float(np.mean(v)) * 100 for bw, v in acc.items()} | {"per_seed": acc, "gap_sem": sem}


# ------------------------------------------------------------------------------------------ output

COLUMNS = [
    "case", "solver", "fedeq_ms", "torchdeq_ms", "limit_ms", "floor_ms",
    "fedeq/limit", "torchdeq/limit", "fedeq/torchdeq", "floor/limit", "fedeq/floor", "nfe_f", "vjp",
    "f_grad_fedeq", "f_grad_torchdeq", "mem_fedeq_mb", "mem_torchdeq_mb", "mem_limit_mb",
    "res_f_fedeq", "res_f_torchdeq", "res_f_limit", "res_b_fedeq", "res_b_torchdeq", "res_b_limit",
    "fwd_ms_fedeq", "bwd_ms_fedeq", "fwd_ms_torchdeq", "bwd_ms_torchdeq", "fwd_ms_limit", "bwd_ms_limit",
    "fwd_ms_floor", "bwd_ms_floor",
]  # fmt: skip


def row_record(r: Row) -> dict[str, Any]:
    f, t, lim = r.ms("fedeq"), r.ms("torchdeq"), r.ms("limit")
    floor = "floor" if "floor" in r.times else "limit"
    rec: dict[str, Any] = {
        "case": r.case,
        "solver": r.solver,
        "fedeq_ms": f,
        "torchdeq_ms": t,
        "limit_ms": lim,
        "floor_ms": r.ms(floor),
        "fedeq/limit": r.ratio("fedeq", "limit"),
        "torchdeq/limit": r.ratio("torchdeq", "limit"),
        "fedeq/torchdeq": r.ratio("fedeq", "torchdeq"),
        "floor/limit": r.ratio(floor, "limit"),
        "fedeq/floor": r.ratio("fedeq", floor),
        "nfe_f": r.counts["fedeq"]["f_nograd"],
        "vjp": r.counts["fedeq"]["vjp"],
        "f_grad_fedeq": r.counts["fedeq"]["f_grad"],
        "f_grad_torchdeq": r.counts["torchdeq"]["f_grad"],
    }
    for who in ("fedeq", "torchdeq", "limit"):
        rec[f"mem_{who}_mb"] = r.mem[who]
        rec[f"res_f_{who}"] = r.res[who]["res_f"]
        rec[f"res_b_{who}"] = r.res[who]["res_b"]
        rec[f"fwd_ms_{who}"] = r.ms(who, "fwd")
        rec[f"bwd_ms_{who}"] = r.ms(who, "bwd")
    rec["fwd_ms_floor"], rec["bwd_ms_floor"] = r.ms(floor, "fwd"), r.ms(floor, "bwd")
    return rec


def print_table(records: list[dict[str, Any]], mem_label: str) -> None:
    headers = [
        ("case", "case"), ("solver", "solver"), ("fedeq ms", "fedeq_ms"), ("torchdeq ms", "torchdeq_ms"),
        ("limit ms", "limit_ms"), ("fedeq/lim", "fedeq/limit"), ("tdeq/lim", "torchdeq/limit"),
        ("fedeq/tdeq", "fedeq/torchdeq"), ("floor/lim", "floor/limit"), ("fedeq/floor", "fedeq/floor"),
        ("nfe f/vjp", None), (f"{mem_label} MB f/t/lim", None),
        ("res fwd f | t", None), ("res bwd f | t", None),
    ]  # fmt: skip
    lines = []
    for rec in records:
        cells = []
        for _, key in headers[:10]:
            v = rec[key]
            cells.append(f"{v:.2f}" if "/" in key else f"{v:.1f}" if isinstance(v, float) else str(v))
        cells.append(f"{rec['nfe_f']}/{rec['vjp']}")
        cells.append(f"{rec['mem_fedeq_mb']:.1f}/{rec['mem_torchdeq_mb']:.1f}/{rec['mem_limit_mb']:.1f}")
        cells.append(f"{rec['res_f_fedeq']:.1e} | {rec['res_f_torchdeq']:.1e}")
        cells.append(f"{rec['res_b_fedeq']:.1e} | {rec['res_b_torchdeq']:.1e}")
        lines.append(cells)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DEQ training step (median)")
    for h, _ in headers:
        table.add_column(h, justify="left" if h in ("case", "solver") else "right")
    for c in lines:
        table.add_row(*c)
    Console(width=200).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None, help="timed steps per column (default 30, quick 7)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per column (default 5, quick 2)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, 1 training seed, 2 epochs")
    p.add_argument("--iters", type=int, default=20, help="forward and backward evaluations (default 20)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=128, help="MLP batch size")
    p.add_argument("--cases", default="mlp,conv", help="comma-separated subset of mlp,conv")
    p.add_argument("--solvers", default="fixed_point,anderson,broyden")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for all columns")
    p.add_argument(
        "--timer",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: time.perf_counter; cpu: process CPU time, steadier on a shared machine (use --threads 1)",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the accuracy check (5)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds of the accuracy check (8)")
    p.add_argument("--no-train", action="store_true", help="skip the broyden_reuse accuracy check")
    p.add_argument("--csv", default=None, help="write the table (and the broyden_reuse rows) to this CSV")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (7 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.seeds = args.seeds or (1 if args.quick else 8)
    for name in args.solvers.split(","):
        if name not in SOLVERS:
            p.error(f"--solvers: unknown solver {name!r}; allowed: {', '.join(SOLVERS)}")
    for name in args.cases.split(","):
        if name not in ("mlp", "conv"):
            p.error(f"--cases: unknown case {name!r}; allowed: mlp, conv")
    return args


def main(argv: list[str] | None = None) -> None:
    global _clock
    args = parse_args(argv)
    device = resolve_device(args.device)
    _clock = CLOCKS[args.timer]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    mem_label = "CUDA peak" if device.type == "cuda" else "CPU peak"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, device {device} ({dev_name}), "
        f"{threads} threads (os cpus {os.cpu_count()}), "
        f"{args.iters} forward + {args.iters} backward iterations, tol {TINY_TOL:g} (abs), "
        f"median of {args.repeats} after {args.warmup} warm-up steps, {args.timer} clock"
    )
    mem_note = (
        "torch.cuda.max_memory_allocated above the allocation at step start"
        if device.type == "cuda"
        else "peak of the running sum of torch.profiler memory events (allocations - frees) during the step"
    )
    print(f"memory: {mem_label} = {mem_note}")
    cases = make_cases(device, args.cases.split(","), args.hidden, args.batch)
    for c in cases:
        print(f"case {c.name}: {c.description}")

    records = []
    for case in cases:
        for solver in args.solvers.split(","):
            row = bench_solver(case, solver, args, device)
            records.append(row_record(row))
            print(f"  done {case.name}/{solver}", flush=True)
    print_table(records, mem_label)

    reuse_records = []
    for case in cases:
        r = bench_reuse(case, args, device)
        r["case"] = case.name
        reuse_records.append(r)
        print(
            f"broyden_reuse {case.name}: backward {r['reuse_bwd_ms']:.2f} ms vs ift {r['ift_bwd_ms']:.2f} ms "
            f"-> ratio {r['bwd_ratio']:.3f} (target <= 0.15)"
        )
    acc = None
    if not args.no_train:
        t0 = time.perf_counter()
        acc = reuse_accuracy(args, device)
        print(
            f"accuracy (MLPDEQ digits, hidden {args.hidden}, broyden {args.iters}, {args.epochs} epochs, "
            f"{args.seeds} seed(s)): ift {acc['ift']:.2f}%, broyden_reuse {acc['broyden_reuse']:.2f}% "
            f"-> gap {acc['ift'] - acc['broyden_reuse']:+.2f} ± {acc['gap_sem']:.2f} (s.e.) points "
            "(target within 1) "
            f"[{time.perf_counter() - t0:.0f} s]"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["device", "threads", "timer", *COLUMNS])
            for rec in records:
                w.writerow([device.type, threads, args.timer, *(rec[c] for c in COLUMNS)])
            w.writerow([])
            keys = ["ift_fwd_ms", "ift_bwd_ms", "reuse_fwd_ms", "reuse_bwd_ms", "bwd_ratio"]
            w.writerow(["device", "threads", "timer", "case", *keys])
            for r in reuse_records:
                w.writerow([device.type, threads, args.timer, r["case"], *(r[k] for k in keys)])
            if acc is not None:
                w.writerow([])
                w.writerow(["device", "threads", "accuracy_ift", "accuracy_broyden_reuse", "epochs", "seeds"])
                w.writerow([device.type, threads, acc["ift"], acc["broyden_reuse"], args.epochs, args.seeds])
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
