"""Studies of the model families (mondeq, tied, tied_sparse, potential_deq, lyadeq) next to the plain DEQ.

Sub-commands (each prints a Markdown table and writes ``<out>/<name>.csv``):

- ``central``: central training of every family on each data set; test accuracy, parameters, bytes per round
  (size of the ``ArrayRecord`` a federated round sends), mean forward iterations at evaluation.
- ``tied``: weight-tied models: accuracy and time per training step vs depth, width and mask density, next to
  the DEQ of the same width (the claim of Song, Majumder & Lin to check).
- ``robustness``: accuracy under small input perturbations (uniform noise, one-step FGSM) and relative
  sensitivity of the equilibrium, the potential DEQ vs the plain DEQ (and MON-DEQ); LyaDEQ's own robustness
  study is ``simulations/robustness.py --study lyadeq``.
- ``mondeq``: MON-DEQ with each splitting (``pr``, ``fb``) and backward mode (``ift``, ``phantom``,
  ``jfb``) at the family's default margin and step sizes: accuracy, forward iterations, converged fraction
  and step size at evaluation. Run it with ``PYTHONPATH`` pointing at an older checkout of ``fedeq`` to
  compare versions (it prints which ``fedeq`` it imported; docs/model_families.md, "MON-DEQ before and
  after").
- ``federated``: ``fedeq simulate`` of every family on each data set (same tiers and strategy for all).
- ``table``: the federated runs' results next to the central ones.

Example::

    python simulations/model_families.py central --data digits mnist5k
    python simulations/model_families.py federated --data digits mnist5k --rounds 20
    python simulations/model_families.py table
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fedeq.config import ModelConfig
from fedeq.data import DatasetSplits, load_dataset, to_tensors
from fedeq.models import build_model, num_parameters
from fedeq.train import evaluate, train_local

FAMILIES = ("mlp_deq", "mondeq", "conv_mondeq", "tied", "tied_sparse", "potential_deq", "lyadeq")
#: The "laptop" tier of the default config: what central runs train and evaluate with.
CENTRAL_DEQ = {"solver": "anderson", "f_max_iter": 12, "b_max_iter": 8, "backward": "ift"}
#: Local-training settings per data set (central and federated).
TRAIN = {
    "digits": {"lr": 0.01, "batch_size": 32, "epochs": 10},
    "mnist5k": {"lr": 0.003, "batch_size": 64, "epochs": 8},
}
FED_CONFIG = {"digits": "simulations/configs/default.yaml", "mnist5k": "simulations/configs/mnist5k.yaml"}


def model_bytes(model: nn.Module) -> int:
    """Bytes of the arrays a federated round sends (``ArrayRecord`` of the state dict)."""
    from flwr.app import ArrayRecord

    return int(ArrayRecord(model.state_dict()).count_bytes())


def train_epochs(
    model: nn.Module,
    data: DatasetSplits,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    deq: dict[str, Any],
) -> float:
    """Train ``model`` on ``data``'s training split one epoch at a time (epoch ``e`` shuffled with seed
    ``1000·seed + e``); returns the training compute seconds."""
    compute = 0.0
    for epoch in range(epochs):
        st = train_local(
            model,
            data.x_train,
            data.y_train,
            epochs=1,
            lr=lr,
            batch_size=batch_size,
            seed=seed * 1000 + epoch,
            deq=deq,
        )
        compute += st.compute_s
    return compute


def run_central(
    name: str,
    data: DatasetSplits,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    deq: dict[str, Any],
    **cfg: Any,
) -> dict[str, Any]:
    """Train ``name`` centrally and evaluate it (same DEQ settings for training and evaluation)."""
    torch.manual_seed(seed)
    model = build_model(name, data.input_shape, data.num_classes, ModelConfig(**cfg), **deq)
    compute = train_epochs(model, data, seed, epochs, lr, batch_size, deq)
    ev = evaluate(model, data.x_test, data.y_test, **deq)
    step_ms, eval_ms = time_steps(model, data, batch_size, deq)
    return {
        "model": name,
        "data": data.name,
        "seed": seed,
        **cfg,
        "test_acc": ev.accuracy,
        "test_loss": ev.loss,
        "eval_nfe": ev.nfe_fwd,
        "eval_residual": ev.fp_residual,
        "params": num_parameters(model),
        "bytes": model_bytes(model),
        "step_ms": step_ms,
        "eval_ms": eval_ms,
        "train_s": compute,
        "_model": model,
    }


def time_steps(
    model: nn.Module, data: DatasetSplits, batch_size: int, deq: dict[str, Any], reps: int = 15
) -> tuple[float, float]:
    """Median wall time (ms) of one training step (forward + backward, batch ``batch_size``) and of one
    evaluation forward pass (batch 256), after a warm-up; medians resist the noise of a shared CPU."""
    x, y = to_tensors(data.x_train[:256], data.y_train[:256])
    xb, yb = x[:batch_size], y[:batch_size]
    train_t, eval_t = [], []
    model.train()
    for i in range(reps + 2):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb, **deq).logits, yb).backward()
        if i >= 2:
            train_t.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        for i in range(reps + 2):
            t0 = time.perf_counter()
            model(x, **deq)
            if i >= 2:
                eval_t.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return 1000 * float(np.median(train_t)), 1000 * float(np.median(eval_t))


def _mean_std(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=False)
    out = g[cols].mean()
    if "test_acc" in cols:
        out["test_acc_std"] = g["test_acc"].std(ddof=0)
    return out.reset_index()


def _markdown(df: pd.DataFrame, floatfmt: dict[str, str] | None = None) -> str:
    floatfmt = floatfmt or {}
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else format(v, floatfmt.get(c, ".4g")))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(df: pd.DataFrame, out: Path, name: str, table: pd.DataFrame, fmt: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=[c for c in df.columns if c.startswith("_")]).to_csv(out / f"{name}.csv", index=False)
    text = _markdown(table, fmt)
    (out / f"{name}.md").write_text(text + "\n")
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------
# central
# ------------------------------------------------------------------------------------------------


def cmd_central(ns: argparse.Namespace) -> None:
    rows = []
    for data_name in ns.data:
        data = load_dataset(data_name)
        tr = TRAIN[data_name]
        for name in ns.models:
            for seed in range(ns.seeds):
                r = run_central(
                    name, data, seed, tr["epochs"], tr["lr"], tr["batch_size"], CENTRAL_DEQ, hidden=ns.hidden
                )
                print(f"{data_name} {name} seed {seed}: acc {r['test_acc']:.4f}", flush=True)
                rows.append(r)
    df = pd.DataFrame(rows)
    previous = ns.out / "central.csv"
    if previous.exists():  # keep the rows of (data, model) pairs not run this time
        old = pd.read_csv(previous)
        done = set(zip(df["data"], df["model"], strict=True))
        keep = [(d, m) not in done for d, m in zip(old["data"], old["model"], strict=True)]
        df = pd.concat([old[keep], df], ignore_index=True)
    cols = ["test_acc", "params", "bytes", "eval_nfe", "step_ms", "eval_ms"]
    table = _mean_std(df, ["data", "model"], cols)
    table = table[
        ["data", "model", "test_acc", "test_acc_std", "params", "bytes", "eval_nfe", "step_ms", "eval_ms"]
    ]
    _save(
        df,
        ns.out,
        "central",
        table,
        {
            "test_acc": ".4f",
            "test_acc_std": ".4f",
            "eval_nfe": ".1f",
            "step_ms": ".1f",
            "eval_ms": ".1f",
            "params": ".0f",
            "bytes": ".0f",
        },
    )


# ------------------------------------------------------------------------------------------------
# weight-tied study
# ------------------------------------------------------------------------------------------------


def tied_grid(
    widths: Sequence[int], depths: Sequence[int], densities: Sequence[float]
) -> list[dict[str, Any]]:
    """Depth sweep at width 64, width sweep at depth 4, density sweep at width 64 / depth 4, plus DEQs."""
    grid: list[dict[str, Any]] = []
    seen = set()

    def add(model: str, **kw: Any) -> None:
        key = (model, tuple(sorted(kw.items())))
        if key not in seen:
            seen.add(key)
            grid.append({"model": model, **kw})

    for depth in depths:
        add("tied", hidden=64, depth=depth, mask_density=1.0)
        add("tied_sparse", hidden=64, depth=depth, mask_density=0.5)
    for width in widths:
        add("tied", hidden=width, depth=4, mask_density=1.0)
        add("tied_sparse", hidden=width, depth=4, mask_density=0.5)
        add("mlp_deq", hidden=width, depth=0, mask_density=1.0)
    for p in densities:
        add("tied_sparse" if p < 1 else "tied", hidden=64, depth=4, mask_density=p)
    add("tied_sparse", hidden=64, depth=4, mask_density=0.5, mask_pattern="row")
    return grid


def cmd_tied(ns: argparse.Namespace) -> None:
    rows = []
    for data_name in ns.data:
        data = load_dataset(data_name)
        tr = TRAIN[data_name]
        for spec in tied_grid(ns.widths, ns.depths, ns.densities):
            spec = {"mask_pattern": "unstructured", **spec}
            name = spec["model"]
            cfg = {k: v for k, v in spec.items() if k != "model"}
            deq = dict(CENTRAL_DEQ)
            if name != "mlp_deq":  # tied_grid gives the DEQs depth 0
                deq.update(f_max_iter=max(cfg["depth"], 1), b_max_iter=max(cfg["depth"], 1))
            for seed in range(ns.seeds):
                r = run_central(
                    name,
                    data,
                    seed,
                    tr["epochs"],
                    tr["lr"],
                    tr["batch_size"],
                    deq,
                    **{**cfg, "depth": max(cfg["depth"], 1)},
                )
                r["depth"] = cfg["depth"]
                r["unstable"] = not math.isfinite(r["test_loss"])
                print(
                    f"{data_name} {spec}: seed {seed} acc {r['test_acc']:.4f} step {r['step_ms']:.1f} ms",
                    flush=True,
                )
                rows.append(r)
    df = pd.DataFrame(rows)
    keys = ["data", "model", "hidden", "depth", "mask_density", "mask_pattern"]
    table = _mean_std(df, keys, ["test_acc", "params", "step_ms", "eval_ms", "eval_nfe"])
    table["depth"] = table["depth"].map(lambda d: "∞ (DEQ)" if d == 0 else str(int(d)))
    table = table[keys + ["test_acc", "test_acc_std", "params", "step_ms", "eval_ms", "eval_nfe"]]
    _save(
        df,
        ns.out,
        "tied_study",
        table,
        {
            "test_acc": ".4f",
            "test_acc_std": ".4f",
            "step_ms": ".1f",
            "eval_ms": ".1f",
            "eval_nfe": ".1f",
            "params": ".0f",
            "mask_density": ".2f",
        },
    )


# ------------------------------------------------------------------------------------------------
# MON-DEQ: splittings and backward modes
# ------------------------------------------------------------------------------------------------

#: Plain splitting iterations (the paper's solver) under a device-like budget.
MONDEQ_DEQ = {"solver": "fixed_point", "f_max_iter": 40, "b_max_iter": 8, "tol": 1e-3}


def cmd_mondeq(ns: argparse.Namespace) -> None:
    import fedeq

    print(f"fedeq imported from {Path(fedeq.__file__).parent}", flush=True)
    rows = []
    for data_name in ns.data:
        data = load_dataset(data_name)
        tr = TRAIN[data_name]
        epochs = ns.epochs or tr["epochs"]
        x_test, _ = to_tensors(data.x_test, data.y_test)
        for splitting in ("pr", "fb"):
            for backward in ns.backwards:
                deq = {**MONDEQ_DEQ, "backward": backward}
                for seed in range(ns.seeds):
                    torch.manual_seed(seed)
                    model = build_model(
                        "mondeq", data.input_shape, data.num_classes, ModelConfig(hidden=ns.hidden)
                    )
                    model.splitting = splitting
                    t0 = time.perf_counter()
                    train_epochs(model, data, seed, epochs, tr["lr"], tr["batch_size"], deq)
                    ev = evaluate(model, data.x_test, data.y_test, **deq)
                    with torch.no_grad():
                        fwd = model(x_test, **deq).deq.forward
                    conv = float(fwd.converged.float().mean())
                    r = {
                        "data": data_name,
                        "splitting": splitting,
                        "backward": backward,
                        "seed": seed,
                        "m": float(model.mon.m),
                        "test_acc": ev.accuracy,
                        "eval_nfe": ev.nfe_fwd,
                        "converged": conv,
                        "alpha": float(fwd.extra.get("alpha", float("nan"))),
                        "train_s": time.perf_counter() - t0,
                    }
                    print(r, flush=True)
                    rows.append(r)
    df = pd.DataFrame(rows)
    keys = ["data", "splitting", "backward", "m"]
    table = _mean_std(df, keys, ["test_acc", "eval_nfe", "converged", "alpha", "train_s"])
    table = table[keys + ["test_acc", "test_acc_std", "eval_nfe", "converged", "alpha", "train_s"]]
    fmt = {"test_acc": ".4f", "test_acc_std": ".4f", "eval_nfe": ".1f", "converged": ".3f", "alpha": ".3g"}
    fmt["train_s"] = ".0f"
    _save(df, ns.out, f"mondeq_{ns.tag}", table, fmt)


# ------------------------------------------------------------------------------------------------
# robustness
# ------------------------------------------------------------------------------------------------


def _perturbed_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    kind: str,
    deq: dict[str, Any],
    gen: torch.Generator,
) -> float:
    model.eval()
    if kind == "noise":
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    else:  # FGSM: one signed-gradient step of size eps (L∞)
        xr = x.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xr, **deq).logits, y)
            (g,) = torch.autograd.grad(loss, xr)
        delta = eps * g.sign()
    xa = (x + delta).clamp(0.0, 1.0)
    with torch.no_grad():
        return float((model(xa, **deq).logits.argmax(dim=1) == y).float().mean())


def _equilibrium(model: nn.Module, x: torch.Tensor, deq: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **deq).deq.z


def cmd_robustness(ns: argparse.Namespace) -> None:
    rows = []
    for data_name in ns.data:
        data = load_dataset(data_name)
        tr = TRAIN[data_name]
        x, y = to_tensors(data.x_test, data.y_test)
        for name in ns.models:
            for seed in range(ns.seeds):
                r = run_central(
                    name, data, seed, tr["epochs"], tr["lr"], tr["batch_size"], CENTRAL_DEQ, hidden=ns.hidden
                )
                model = r.pop("_model")
                gen = torch.Generator().manual_seed(seed)
                row = {"data": data_name, "model": name, "seed": seed, "clean": r["test_acc"]}
                for eps in ns.noise:
                    row[f"noise {eps:g}"] = _perturbed_accuracy(model, x, y, eps, "noise", CENTRAL_DEQ, gen)
                for eps in ns.fgsm:
                    row[f"fgsm {eps:g}"] = _perturbed_accuracy(model, x, y, eps, "fgsm", CENTRAL_DEQ, gen)
                delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * ns.sens_eps
                xp = (x + delta).clamp(0, 1)
                z0 = _equilibrium(model, x, CENTRAL_DEQ)
                z1 = _equilibrium(model, xp, CENTRAL_DEQ)
                dx = (xp - x).flatten(1)
                rel = ((z1 - z0).norm(dim=1) / z0.norm(dim=1).clamp_min(1e-12)) / (
                    dx.norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
                )
                row["z sensitivity"] = float(rel.mean())
                print(row, flush=True)
                rows.append(row)
    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if c not in ("data", "model", "seed")]
    table = df.groupby(["data", "model"], sort=False)[cols].mean().reset_index()
    _save(df, ns.out, "robustness", table, {c: ".3f" for c in cols})


# ------------------------------------------------------------------------------------------------
# federated
# ------------------------------------------------------------------------------------------------


def fed_overrides(data_name: str, name: str, rounds: int, out: Path, hidden: int) -> list[str]:
    tr = TRAIN[data_name]
    return [
        f"model.name={name}",
        f"model.hidden={hidden}",
        f"rounds={rounds}",
        "train.local_epochs=2",
        f"train.lr={tr['lr']}",
        f"train.batch_size={tr['batch_size']}",
        f"output_dir={out / 'fed'}",
        f"run_name={data_name}-{name}",
    ]


def cmd_federated(ns: argparse.Namespace) -> None:
    from fedeq.config import load_config
    from fedeq.engines.simulate import simulate

    for data_name in ns.data:
        for name in ns.models:
            overrides = fed_overrides(data_name, name, ns.rounds, ns.out, ns.hidden)
            print("fedeq simulate", FED_CONFIG[data_name], " ".join(overrides), flush=True)
            cfg = load_config(FED_CONFIG[data_name], overrides)
            t0 = time.perf_counter()
            simulate(cfg, quiet=True)
            print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def cmd_table(ns: argparse.Namespace) -> None:
    central = pd.read_csv(ns.out / "central.csv") if (ns.out / "central.csv").exists() else None
    rows = []
    for run in sorted((ns.out / "fed").glob("*-*")):
        summary = json.loads((run / "summary.json").read_text())
        clients = pd.read_csv(run / "clients.csv")
        ok = clients[clients["status"] == "ok"]
        curve = pd.read_csv(run / "budget_curve.csv") if (run / "budget_curve.csv").exists() else None
        data_name, name = run.name.split("-", 1)
        row = {
            "data": data_name,
            "model": name,
            "central_acc": float("nan"),
            "fed_acc": summary["final_test_acc"],
            "fed_best_acc": summary["best_test_acc"],
            "params": summary["num_parameters"],
            "bytes_per_round": summary["model_bytes"],
            "client_nfe_fwd": float(ok["nfe_fwd"].mean()),
            "client_nfe_bwd": float(ok["nfe_bwd"].mean()),
            "eval_nfe@32": float(curve["nfe_fwd"].iloc[-1]) if curve is not None else float("nan"),
        }
        if central is not None:
            sel = central[(central["data"] == data_name) & (central["model"] == name)]
            if len(sel):
                row["central_acc"] = float(sel["test_acc"].mean())
        rows.append(row)
    df = pd.DataFrame(rows)
    fmt = {
        "central_acc": ".4f",
        "fed_acc": ".4f",
        "fed_best_acc": ".4f",
        "client_nfe_fwd": ".1f",
        "client_nfe_bwd": ".1f",
        "eval_nfe@32": ".1f",
        "params": ".0f",
        "bytes_per_round": ".0f",
    }
    _save(df, ns.out, "families_table", df, fmt)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["central", "tied", "mondeq", "robustness", "federated", "table"])
    p.add_argument("--data", nargs="+", default=["digits"], choices=list(TRAIN))
    p.add_argument("--models", nargs="+", default=list(FAMILIES))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--widths", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--depths", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--fgsm", nargs="+", type=float, default=[0.02, 0.05, 0.1])
    p.add_argument("--sens-eps", type=float, default=0.1)
    p.add_argument("--backwards", nargs="+", default=["ift", "phantom", "jfb"])
    p.add_argument("--epochs", type=int, default=0, help="mondeq: epochs (0: the data set's default)")
    p.add_argument("--tag", default="current", help="mondeq: suffix of the output files")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings use 1)")
    p.add_argument("--out", type=Path, default=Path("outputs/model_families"))
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    if ns.command == "robustness" and ns.models == list(FAMILIES):
        ns.models = ["mlp_deq", "potential_deq", "mondeq"]
    {
        "central": cmd_central,
        "tied": cmd_tied,
        "mondeq": cmd_mondeq,
        "robustness": cmd_robustness,
        "federated": cmd_federated,
        "table": cmd_table,
    }[ns.command](ns)


if __name__ == "__main__":
    main()
