"""The end of ``fedeq sweep``: its tables and plots written, and the summary table printed, all read back from
the runs' folders."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from fedeq.cli.sweep_plan import SweepPlan

__all__ = ["print_sweep_summary", "sweep_table"]


def _pm(row: Any, metric: str, fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    mean, half = row.get(f"{metric}_mean"), row.get(f"{metric}_ci95")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = fmt.format(mean / scale)
    return text if half is None or not math.isfinite(half) else f"{text} ± {fmt.format(half / scale)}"


def _bytes(row: Any) -> str:
    mean, half = row.get("bytes_to_target_mean"), row.get("bytes_to_target_ci95")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = decimal(int(mean))
    return text if half is None or not math.isfinite(half) else f"{text} ± {decimal(int(half))}"


PERSONAL_COLUMNS = [
    ("personal acc", "final_personal_acc", "{:.4f}", 1.0),
    ("worst 10% of clients", "final_personal_worst10", "{:.4f}", 1.0),
    ("global acc on client splits", "final_global_acc_clients", "{:.4f}", 1.0),
    ("kB per round", "bytes_per_round", "{:.1f}", 1e3),
    ("peak train MB", "peak_train_mem_mb", "{:.3f}", 1.0),
]
"""The columns a sweep of personalised runs shows in place of the tiers' (label, metric, format, scale)."""


def sweep_table(summary: pd.DataFrame, target: float) -> Table:
    """``summary.csv`` as a rich table: one row per grid point, means ± 95% interval half-widths
    ("reached": the seeds that reached the target of all seeds that finished)."""
    table = Table(
        title=f"sweep summary (mean ± 95% CI over seeds; target accuracy {target:g})",
        title_justify="left",
        box=box.SIMPLE,
        pad_edge=False,
    )
    for name in (
        "grid point",
        "final acc",
        "best acc",
        "reached",
        "rounds to target",
        "sim s to target",
        "bytes to target",
    ):
        table.add_column(name, overflow="fold")
    tiers = [
        c[: -len("_mean")] for c in summary.columns if c.startswith("final_acc@") and c.endswith("_mean")
    ]
    extra = [(f"final acc at {tier[10:]}'s budget", tier, "{:.4f}", 1.0) for tier in tiers]
    if "final_personal_acc_mean" in summary.columns:  # personalised runs: their own numbers instead
        extra = PERSONAL_COLUMNS
    for name, *_ in extra:
        table.add_column(name, overflow="fold")
    for row in summary.to_dict("records"):
        table.add_row(
            str(row["point"]),
            _pm(row, "final_acc"),
            _pm(row, "best_acc"),
            f"{row['reached']}/{row['seeds']}",
            _pm(row, "rounds_to_target", "{:.1f}"),
            _pm(row, "sim_time_to_target_s", "{:.2f}"),
            _bytes(row),
            *(_pm(row, metric, fmt, scale) for _, metric, fmt, scale in extra),
        )
    return table


def print_sweep_summary(plan: SweepPlan, target: float, console: Console | None = None) -> pd.DataFrame:
    """Write ``sweep.csv``, ``summary.csv`` and the plots into the sweep folder, print the summary table;
    return the summary."""
    from fedeq.cli.sweep import sweep_runs
    from fedeq.results.sweep_plots import plot_sweep
    from fedeq.results.sweep_summary import write_tables

    runs = sweep_runs(plan)
    _, summary = write_tables(plan.out, runs, list(plan.grid), target)
    plot_sweep(plan.out, runs)
    console = console or Console()
    console.print(sweep_table(summary, target))
    console.print(f"results written to {plan.out}", soft_wrap=True, markup=False, highlight=False)
    return summary
