"""PNG plots of a run (matplotlib, headless), built from the files of its output folder.

:func:`load_run` reads a run folder into a :class:`RunView`, :func:`build_figures` turns it into matplotlib
figures (one per file name, for inspection or for your own styling) and :func:`plot_run` writes them:

- ``accuracy.png``: test accuracy per round from round 0 (the initial model), the global model and the model
  at each tier's budget (``test_acc@<tier>``, dashed with its own marker, so a tier that coincides with the
  global curve stays visible);
- ``accuracy_vs_sim_time.png``: test accuracy against the simulated time (0 for the initial model);
- ``solver_per_tier.png``: the mean fixed-point residual and mean forward function evaluations the clients
  of each tier reported per round (from ``clients.csv``, accepted replies), with each tier's forward budget;
- ``accuracy_vs_budget.png``: the anytime curve of the final global model, with each tier's forward budget
  marked.

Every figure's title names the run. Accuracy axes never span less than 0.1, so a change of two points is not
drawn as a cliff.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

__all__ = [
    "MIN_ACC_SPAN",
    "RunView",
    "accuracy_limits",
    "build_figures",
    "load_run",
    "plot_run",
    "tier_means",
]

MIN_ACC_SPAN = 0.1
"""The smallest range of accuracy an axis shows."""

_MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">", "*", "h")
_STATS = (("residual", "mean relative fixed-point residual"), ("nfe_fwd", "mean forward evaluations"))


@dataclass
class RunView:
    """What the plots of one run read.

    ``rounds`` has one row per round (round 0, the initial model, first when known); ``clients`` the rows of
    ``clients.csv``; ``curve`` the anytime curve (``budget``, ``accuracy``); ``tier_budgets`` each tier's
    forward budget, in the config's tier order.
    """

    name: str
    rounds: pd.DataFrame
    clients: pd.DataFrame = field(default_factory=pd.DataFrame)
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)
    tier_budgets: dict[str, int] = field(default_factory=dict)


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


def load_run(out_dir: str | Path) -> RunView:
    """The :class:`RunView` of the run folder ``out_dir`` (``rounds.csv``, ``clients.csv``,
    ``budget_curve.csv``, ``summary.json`` for round 0, ``config.yaml`` for the tiers)."""
    out = Path(out_dir)
    rounds = _read_csv(out / "rounds.csv")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    initial = summary.get("initial_eval")
    if isinstance(initial, Mapping) and (rounds.empty or 0 not in set(rounds["round"])):
        row = pd.DataFrame([{"round": 0, "sim_time_s": 0.0, "cum_sim_time_s": 0.0, **initial}])
        rounds = row if rounds.empty else pd.concat([row, rounds], ignore_index=True)
    config_path = out / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    tiers = ((config or {}).get("devices") or {}).get("tiers") or []
    budgets = {str(t["name"]): int(t["f_max_iter"]) for t in tiers if "name" in t and "f_max_iter" in t}
    return RunView(
        name=out.name,
        rounds=rounds,
        clients=_read_csv(out / "clients.csv"),
        curve=_read_csv(out / "budget_curve.csv"),
        tier_budgets=budgets,
    )


def accuracy_limits(values: Sequence[float], min_span: float = MIN_ACC_SPAN) -> tuple[float, float]:
    """y-limits for accuracies: the data's range widened to at least ``min_span``, padded, within [0, 1]."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    pad = 0.1 * span
    low, high = mid - span / 2 - pad, mid + span / 2 + pad
    if low < 0:
        low, high = 0.0, min(1.0, high - low)
    if high > 1:
        low, high = max(0.0, low - (high - 1.0)), 1.0
    return low, high


def tier_means(clients: pd.DataFrame, tiers: Sequence[str] = ()) -> dict[str, pd.DataFrame]:
    """Per tier, the means over its accepted client calls of each round: ``round``, ``residual``,
    ``nfe_fwd``, ``nfe_bwd`` (tiers in the order of ``tiers``, then any others)."""
    needed = {"round", "tier", "status", *(s for s, _ in _STATS)}
    if clients.empty or not needed <= set(clients.columns):
        return {}
    ok = clients[(clients["status"] == "ok") & clients["tier"].notna()]
    cols = [c for c in ("residual", "nfe_fwd", "nfe_bwd") if c in ok.columns]
    names = [t for t in tiers if t in set(ok["tier"])] + sorted(set(ok["tier"]) - set(tiers))
    out = {}
    for name in names:
        rows = ok[ok["tier"] == name]
        out[str(name)] = rows.groupby("round", as_index=False)[cols].mean().sort_values("round")
    return out


def _tier_style(i: int) -> dict[str, Any]:
    return {"color": f"C{(i + 1) % 10}", "marker": _MARKERS[i % len(_MARKERS)]}


def _round_axis(ax: Any, label: str = "round (0 = initial model)") -> None:
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)


def _accuracy_figure(run: RunView) -> Figure:
    rounds = run.rounds
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(
        rounds["round"],
        rounds["test_acc"],
        color="C0",
        marker="o",
        markersize=9,
        linewidth=3,
        alpha=0.45,
        label="global model (largest tier budget)",
    )
    tier_cols = [c for c in rounds.columns if c.startswith("test_acc@")]
    order = list(run.tier_budgets)
    tier_cols.sort(key=lambda c: order.index(c[9:]) if c[9:] in order else len(order))
    values = list(rounds["test_acc"])
    for i, col in enumerate(tier_cols):
        ax.plot(
            rounds["round"],
            rounds[col],
            linestyle="--",
            linewidth=1.2,
            markersize=5,
            label=f"at {col[9:]}'s budget",
            **_tier_style(i),
        )
        values += list(rounds[col])
    _round_axis(ax)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(*accuracy_limits(values))
    ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: test accuracy per round")
    return fig


def _sim_time_figure(run: RunView) -> Figure:
    rounds = run.rounds
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(rounds["cum_sim_time_s"], rounds["test_acc"], marker="o")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(*accuracy_limits(list(rounds["test_acc"])))
    ax.grid(alpha=0.3)
    fig.suptitle(f"{run.name}: test accuracy vs simulated time")
    return fig


def _personal_figure(run: RunView) -> Figure:
    """The clients' personalised accuracy per round (mean and worst 10%) next to the global model's."""
    rounds = run.rounds.dropna(subset=["personal_acc"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = [
        ("personal_acc", "personalised, mean over clients", {"color": "C0", "marker": "o"}),
        ("personal_acc_worst10", "personalised, worst 10% of clients", {"color": "C3", "marker": "v"}),
        ("global_acc_clients", "global model on the clients' test splits", {"color": "C2", "marker": "s"}),
    ]
    values: list[float] = []
    for col, label, style in lines:
        if col in rounds and rounds[col].notna().any():
            ax.plot(rounds["round"], rounds[col], label=label, **style)
            values += list(rounds[col].dropna())
    if "test_acc" in run.rounds:
        ax.plot(
            run.rounds["round"],
            run.rounds["test_acc"],
            color="C7",
            linestyle="--",
            label="global model, central test split",
        )
        values += list(run.rounds["test_acc"].dropna())
    _round_axis(ax, "round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(*accuracy_limits(values))
    ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: personalised accuracy per round")
    return fig


def _solver_figure(run: RunView, means: Mapping[str, pd.DataFrame]) -> Figure:
    fig, axes = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    order = list(run.tier_budgets) + [t for t in means if t not in run.tier_budgets]
    for (stat, label), ax in zip(_STATS, axes, strict=True):
        for name, df in means.items():
            style = _tier_style(order.index(name))
            ax.plot(df["round"], df[stat], linestyle="-", label=name, **style)
            if stat == "nfe_fwd" and name in run.tier_budgets:
                ax.axhline(run.tier_budgets[name], color=style["color"], linestyle=":", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if stat == "residual" and all((df["residual"] > 0).all() for df in means.values()):
            ax.set_yscale("log")
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=7, title="tier", title_fontsize=7)
    axes[1].text(
        0.01,
        0.02,
        "dotted: the tier's forward budget (graph-building and phantom steps come on top)",
        transform=axes[1].transAxes,
        fontsize=6.5,
    )
    _round_axis(axes[1], "round (client training: from round 1)")
    fig.suptitle(f"{run.name}: fixed-point solves of client training, per tier")
    return fig


def _budget_figure(run: RunView) -> Figure:
    curve = run.curve
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(curve["budget"], curve["accuracy"], marker="o", color="C0", label="final global model")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(curve["budget"]) | set(run.tier_budgets.values())))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # budgets as plain numbers
    ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = accuracy_limits(list(curve["accuracy"]))
    ax.set_ylim(low, high)
    for i, (name, budget) in enumerate(run.tier_budgets.items()):
        color = _tier_style(i)["color"]
        ax.axvline(budget, color=color, linestyle="--", linewidth=1, label=f"{name} (budget {budget})")
        ax.text(budget, high, f"{name} ", rotation=90, va="top", ha="right", fontsize=7, color=color)
    ax.set_xlabel("forward budget (function evaluations)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{run.name}: anytime curve of the final global model")
    return fig


def build_figures(run: RunView) -> dict[str, Figure]:
    """The figures of ``run`` by file name (only those its data allows); the caller closes them."""
    figs: dict[str, Figure] = {}
    rounds = run.rounds
    if not rounds.empty and "test_acc" in rounds:
        rounds = rounds.sort_values("round", ignore_index=True)
        run = RunView(run.name, rounds, run.clients, run.curve, run.tier_budgets)
        figs["accuracy.png"] = _accuracy_figure(run)
        if "cum_sim_time_s" in rounds and rounds["cum_sim_time_s"].notna().any():
            figs["accuracy_vs_sim_time.png"] = _sim_time_figure(run)
    if "personal_acc" in run.rounds and run.rounds["personal_acc"].notna().any():
        figs["personal_accuracy.png"] = _personal_figure(run)
    means = tier_means(run.clients, list(run.tier_budgets))
    if means:
        figs["solver_per_tier.png"] = _solver_figure(run, means)
    if not run.curve.empty and {"budget", "accuracy"} <= set(run.curve.columns):
        figs["accuracy_vs_budget.png"] = _budget_figure(run)
    return figs


def plot_run(out_dir: str | Path, run: RunView | None = None) -> list[Path]:
    """Write the PNG plots of the run folder ``out_dir`` (of ``run`` when given); return their paths."""
    out = Path(out_dir)
    paths = []
    for name, fig in build_figures(run if run is not None else load_run(out)).items():
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths
