"""The tables of a sweep, read back from its runs' folders: ``sweep.csv`` (one row per run) and
``summary.csv`` (per grid point: mean and 95% confidence interval over the seeds), and the mean accuracy
curves the sweep plots draw.

The interval is ``mean ± t(0.975, n - 1) · s / √n`` with ``s`` the sample standard deviation of the ``n``
seeds that have the number (none with one seed). The numbers "to target" are those of the first round whose
``test_acc`` reaches the target; seeds that never reach it have none (``NaN``), so their means are over the
seeds that did (``reached`` counts them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedeq.results.run_report import read_report

__all__ = [
    "AXES",
    "METRICS",
    "PERSONAL_METRICS",
    "SweepRun",
    "mean_ci",
    "mean_curves",
    "run_curve",
    "run_numbers",
    "summary_frame",
    "sweep_frame",
    "t_quantile",
    "write_tables",
]

METRICS = ("final_acc", "best_acc", "rounds_to_target", "sim_time_to_target_s", "bytes_to_target")
"""The numbers ``summary.csv`` gives a mean and interval of (plus ``final_acc@<tier>`` per tier)."""

PERSONAL_METRICS = (
    "final_personal_acc",
    "final_personal_worst10",
    "best_personal_acc",
    "final_global_acc_clients",
    "bytes_per_round",
    "peak_train_mem_mb",
)
"""The further numbers of personalised runs (``personalization.method``): the clients' accuracy on their own
test splits (last round's mean and worst-10% mean, best mean), the global model's there, the bytes per round
(up + down) and the largest training memory of a client call (MB, :mod:`fedeq.personal.memory`)."""

AXES = {"round": "round", "sim_time": "cum_sim_time_s", "bytes": "cum_bytes"}
"""Plot axis name -> column of :func:`run_curve`."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its grid point (label and grid values), seed and folder."""

    point: str
    values: Mapping[str, str]
    seed: int
    folder: Path


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency

    return float(t.ppf(p, dof))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half-width of the two-sided t interval, n)`` over the finite ``values`` (NaN when
    undefined: no value, or one value for the interval)."""
    x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return float(x.mean()), half, n


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


def run_curve(folder: str | Path) -> pd.DataFrame:
    """``round``, ``cum_sim_time_s``, ``cum_bytes`` (up + down) and ``test_acc`` of a run, from round 0
    (the initial model, at time and bytes 0) when ``summary.json`` has it. For a personalised run the
    accuracy is the clients' mean personalised accuracy (``personal_acc``), from round 1."""
    folder = Path(folder)
    rounds = _read_csv(folder / "rounds.csv")
    cols = ["round", "cum_sim_time_s", "cum_bytes", "test_acc"]
    if rounds.empty:
        return pd.DataFrame(columns=cols)
    rounds = rounds.sort_values("round", ignore_index=True)
    sent = rounds["bytes_up"].fillna(0) + rounds["bytes_down"].fillna(0)
    curve = pd.DataFrame(
        {
            "round": rounds["round"].astype(int),
            "cum_sim_time_s": rounds["cum_sim_time_s"].astype(float),
            "cum_bytes": sent.cumsum().astype(float),
            "test_acc": rounds[accuracy_column(rounds)].astype(float),
        }
    )
    if "personal_acc" in rounds:
        return curve
    summary = folder / "summary.json"
    initial = json.loads(summary.read_text()).get("initial_eval") if summary.is_file() else None
    if isinstance(initial, Mapping) and "test_acc" in initial:
        start = pd.DataFrame([{"round": 0, "cum_sim_time_s": 0.0, "cum_bytes": 0.0, **initial}])[cols]
        curve = pd.concat([start, curve], ignore_index=True)
    return curve


def accuracy_column(rounds: pd.DataFrame) -> str:
    """The accuracy a run is summarised by: ``personal_acc`` in a personalised run, else ``test_acc``."""
    return "personal_acc" if "personal_acc" in rounds else "test_acc"


def _personal_numbers(rounds: pd.DataFrame) -> dict[str, float]:
    last = rounds.sort_values("round").iloc[-1]
    numbers = {
        "final_personal_acc": float(last["personal_acc"]),
        "final_personal_worst10": float(last["personal_acc_worst10"]),
        "best_personal_acc": float(rounds["personal_acc"].max()),
        "final_global_acc_clients": float(last.get("global_acc_clients", math.nan)),
        "bytes_per_round": float((rounds["bytes_up"] + rounds["bytes_down"]).mean()),
        "peak_train_mem_mb": math.nan,
    }
    if "train_mem_peak_bytes" in rounds and rounds["train_mem_peak_bytes"].notna().any():
        numbers["peak_train_mem_mb"] = float(rounds["train_mem_peak_bytes"].max()) / 1e6
    return numbers


def run_numbers(folder: str | Path, target: float) -> dict[str, Any]:
    """The summary numbers of one run folder (``final_acc@<tier>``: the last round's ``test_acc@<tier>``,
    the global model at that tier's solver and budgets)."""
    folder = Path(folder)
    report = read_report(folder)
    rounds = _read_csv(folder / "rounds.csv")
    numbers: dict[str, Any] = {
        "rounds_done": report.rounds_done,
        "final_acc": report.final_test_acc,
        "best_acc": report.best_test_acc,
        "best_round": report.best_round,
        "sim_time_s": report.sim_time_s,
        "bytes": report.bytes_up + report.bytes_down,
        "rounds_to_target": math.nan,
        "sim_time_to_target_s": math.nan,
        "bytes_to_target": math.nan,
        "no_update": report.failure() is not None,
    }
    curve = run_curve(folder)
    hit = curve[(curve["round"] > 0) & (curve["test_acc"] >= target)]
    if len(hit):
        first = hit.iloc[0]
        numbers["rounds_to_target"] = int(first["round"])
        numbers["sim_time_to_target_s"] = float(first["cum_sim_time_s"])
        numbers["bytes_to_target"] = float(first["cum_bytes"])
    if len(rounds):
        last = rounds.sort_values("round").iloc[-1]
        for col in rounds.columns:
            if col.startswith("test_acc@"):
                numbers[f"final_acc@{col[9:]}"] = float(last[col])
        if "personal_acc" in rounds:
            numbers.update(_personal_numbers(rounds))
    return numbers


def sweep_frame(
    runs: Sequence[SweepRun], grid_keys: Sequence[str], target: float, out: Path | None = None
) -> pd.DataFrame:
    """``sweep.csv``: one row per run with its grid values (empty where a key does not apply), seed,
    ``status`` (``done``; ``missing`` for a run without finished results) and numbers."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"point": run.point, **{k: run.values.get(k) for k in grid_keys}}
        row["seed"] = run.seed
        done = (run.folder / "summary.json").is_file() and "wall_s" in json.loads(
            (run.folder / "summary.json").read_text()
        )
        row["status"] = "done" if done else "missing"
        if done:
            row.update(run_numbers(run.folder, target))
        row["run_dir"] = str(run.folder.relative_to(out)) if out is not None else str(run.folder)
        rows.append(row)
    frame = pd.DataFrame(rows)
    tail = ["run_dir"]
    return frame[[c for c in frame.columns if c not in tail] + tail]


def summary_frame(sweep: pd.DataFrame, grid_keys: Sequence[str], target: float) -> pd.DataFrame:
    """``summary.csv``: per grid point (in the order of ``sweep``) the seeds, how many reached ``target``,
    and ``<metric>_mean`` / ``<metric>_ci95`` (the interval's half-width) of every metric."""
    done = sweep[sweep["status"] == "done"] if "status" in sweep else sweep.iloc[0:0]
    tiers = [c for c in sweep.columns if c.startswith("final_acc@")]
    tiers += [c for c in PERSONAL_METRICS if c in sweep.columns]
    rows = []
    for point in dict.fromkeys(sweep["point"]):
        first = sweep[sweep["point"] == point].iloc[0]
        runs = done[done["point"] == point]
        row: dict[str, Any] = {"point": point, **{k: first[k] for k in grid_keys}}
        row["seeds"] = len(runs)
        row["target_acc"] = target
        row["reached"] = int(runs["rounds_to_target"].notna().sum()) if len(runs) else 0
        for metric in (*METRICS, *tiers):
            values = list(runs[metric]) if metric in runs else []
            mean, half, _ = mean_ci(values)
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean, half
        rows.append(row)
    return pd.DataFrame(rows)


def mean_curves(runs: Sequence[SweepRun], axis: str) -> dict[str, pd.DataFrame]:
    """Per grid point, the test accuracy against ``axis`` (:data:`AXES`) over its seeds: ``x``, ``mean``,
    ``lo``, ``hi`` (95% interval; the mean alone with one seed) and ``n``.

    Each seed's accuracy at ``x`` is that of the last round completed by ``x`` (a step function); ``x``
    runs over every seed's points up to the smallest last point, so that every seed counts everywhere.
    """
    col = AXES[axis]
    by_point: dict[str, list[pd.DataFrame]] = {}
    for run in runs:
        curve = run_curve(run.folder)
        if len(curve):
            by_point.setdefault(run.point, []).append(curve.sort_values(col, kind="stable"))
    out = {}
    for point, curves in by_point.items():
        end = min(float(c[col].max()) for c in curves)
        xs = np.unique(np.concatenate([c[col].to_numpy(float) for c in curves]))
        xs = xs[xs <= end]
        ys = np.array([_steps(c[col].to_numpy(float), c["test_acc"].to_numpy(float), xs) for c in curves])
        stats = [mean_ci(ys[:, i]) for i in range(len(xs))]
        mean = np.array([s[0] for s in stats])
        half = np.nan_to_num(np.array([s[1] for s in stats]))
        out[point] = pd.DataFrame(
            {"x": xs, "mean": mean, "lo": mean - half, "hi": mean + half, "n": [s[2] for s in stats]}
        )
    return out


def _steps(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(x, at, side="right") - 1
    return np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)


def write_tables(
    out: Path, runs: Sequence[SweepRun], grid_keys: Sequence[str], target: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``sweep.csv`` and ``summary.csv`` to the sweep folder ``out``; return both frames."""
    sweep = sweep_frame(runs, grid_keys, target, out)
    summary = summary_frame(sweep, grid_keys, target)
    sweep.to_csv(out / "sweep.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    return sweep, summary
