"""PNG plots of a sweep: test accuracy (a personalised run: the clients' mean personalised accuracy) against
the round, the simulated time and the bytes sent, one line per grid point (the mean over its seeds) with its
95% confidence band (:func:`mean_curves`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402

from fedeq.results.plots import accuracy_limits  # noqa: E402
from fedeq.results.sweep_summary import AXES, SweepRun, mean_curves  # noqa: E402

__all__ = ["PLOT_FILES", "build_sweep_figures", "plot_sweep"]

PLOT_FILES = {
    "round": ("sweep_accuracy_vs_round.png", "round (0 = initial model)"),
    "sim_time": ("sweep_accuracy_vs_sim_time.png", "simulated time (s)"),
    "bytes": ("sweep_accuracy_vs_bytes.png", "bytes sent and received (up + down)"),
}
"""Axis (:data:`AXES`) -> (file name, x label)."""


def _figure(curves: Mapping[str, pd.DataFrame], axis: str, title: str, what: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    values: list[float] = []
    palette = plt.get_cmap("tab20") if len(curves) > 10 else None  # more lines than the default cycle
    for i, (point, df) in enumerate(curves.items()):
        color = palette(i % 20) if palette is not None else f"C{i % 10}"
        steps = "steps-post" if axis != "round" else "default"
        n = int(df["n"].max()) if len(df) else 0
        label = f"{point} ({n} seed{'s' if n != 1 else ''})"
        ax.plot(
            df["x"],
            df["mean"],
            color=color,
            drawstyle=steps,
            marker="o" if axis == "round" else None,
            markersize=4,
            label=label,
        )
        step = "post" if axis != "round" else None
        ax.fill_between(df["x"], df["lo"], df["hi"], color=color, alpha=0.2, linewidth=0, step=step)
        values += [*df["lo"], *df["hi"]]
    label = PLOT_FILES[axis][1]
    ax.set_xlabel(label)
    if axis == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if axis == "bytes":
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.set_ylabel(what)
    ax.set_ylim(*accuracy_limits(values))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{title}: {what} vs {label.split(' (')[0]} (mean, 95% CI over seeds)", fontsize=10)
    return fig


def build_sweep_figures(runs: Sequence[SweepRun], title: str = "sweep") -> dict[str, Figure]:
    """The sweep's figures by file name (an axis without data has none); the caller closes them."""
    figs = {}
    personal = {_is_personal(run.folder) for run in runs}
    what = {
        frozenset({True}): "personalised accuracy (mean over clients)",
        frozenset({False}): "test accuracy",
    }.get(frozenset(personal), "personalised (mean over clients) or test accuracy")
    for axis in AXES:
        curves = mean_curves(runs, axis)
        if curves:
            figs[PLOT_FILES[axis][0]] = _figure(curves, axis, title, what)
    return figs


def _is_personal(folder: Path) -> bool:
    """Whether the run in ``folder`` is personalised (its ``rounds.csv`` has ``personal_acc``)."""
    path = Path(folder) / "rounds.csv"
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as fh:
        return "personal_acc" in fh.readline().split(",")


def plot_sweep(out: str | Path, runs: Sequence[SweepRun]) -> list[Path]:
    """Write the sweep's plots into its folder ``out``; return their paths."""
    out = Path(out)
    paths = []
    for name, fig in build_sweep_figures(runs, out.name).items():
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths
