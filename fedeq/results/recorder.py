"""Run outputs: the folder contract of ``fedeq simulate`` and its plots.

``<output_dir>/<run_name>/`` holds ``config.yaml`` (resolved), ``rounds.csv`` (one row per round),
``clients.csv`` (one row per client call), ``partitions.csv`` (partition sizes and tiers), ``summary.json``
and PNG plots. The CSVs are brought up to date after every round (``clients.csv`` by appending the round's
rows), so an interrupted run keeps what it had; the end of a run rewrites every file whole. A new run never
writes into a folder that already holds one (:func:`claim_run_dir`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedeq.config import ConfigError

ROUND_COLUMNS = (
    "round",
    "wall_s",
    "sim_time_s",
    "cum_sim_time_s",
    "test_acc",
    "test_loss",
    "bytes_up",
    "bytes_down",
    "clients_ok",
    "clients_failed",
    "clients_rejected",
    "clients_offline",
    "clients_dropped",
)
PERSONAL_ROUND_COLUMNS = ("personal_acc", "personal_acc_worst10", "global_acc_clients")
"""``rounds.csv`` columns of a personalised run (``personalization.method``): the clients' accuracy on their
own test splits (mean, mean of the worst 10%) and the global model's there, when there is one."""
CLIENT_COLUMNS = (
    "round",
    "node_id",
    "partition",
    "tier",
    "num_examples",
    "quality",
    "weight",
    "residual",
    "nfe_fwd",
    "nfe_bwd",
    "train_loss",
    "val_loss",
    "compute_s",
    "compute_cpu_s",
    "sim_time_s",
    "status",
    "reason",
)
ASYNC_CLIENT_COLUMNS = (
    *CLIENT_COLUMNS,
    "dispatch",
    "model_version",
    "staleness",
    "staleness_weight",
    "start_s",
    "arrival_s",
)
"""``clients.csv`` of an asynchronous run (``aggregation=async``): each reply's call, version and times."""


def run_dir(output_dir: str | Path, run_name: str | None) -> Path:
    """``output_dir/run_name``; without a name, a timestamped one that does not exist yet."""
    base = Path(output_dir)
    if run_name:
        return base / run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = base / stamp, 1
    while path.exists():
        path, k = base / f"{stamp}-{k}", k + 1
    return path


def run_taken(path: str | Path) -> bool:
    """Whether ``path`` already holds something: a non-empty folder, or a file."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_new_run(path: str | Path) -> Path:
    """``path`` if a new run may write there; a :class:`~fedeq.config.ConfigError` naming ``run_name``
    (with how to continue or replace the run) when it already holds one."""
    path = Path(path)
    if run_taken(path):
        raise ConfigError(
            "run_name",
            f"{path} already holds a run (continue it with fedeq simulate --resume {path}, "
            "or replace it with --overwrite)",
            f"a run_name not used in {path.parent}, or none (a new timestamped folder)",
            path.name,
        )
    return path


def check_replaceable(path: str | Path) -> Path:
    """``path`` if ``--overwrite`` may clear it: it does not exist, is empty, or holds a fedeq run (its
    ``config.yaml``); anything else is a :class:`~fedeq.config.ConfigError` naming ``--overwrite``, so that
    a mistyped ``output_dir``/``run_name`` never deletes a folder that is not a run."""
    path = Path(path)
    if run_taken(path) and not (path / "config.yaml").is_file():
        raise ConfigError(
            "--overwrite",
            f"{path} is not a fedeq run folder (no config.yaml), so it is not replaced",
            "an output_dir/run_name that holds a fedeq run, is empty or does not exist",
            str(path),
        )
    return path


def claim_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the folder of a new run; an existing run there is refused (:func:`check_new_run`), or with
    ``overwrite`` removed first (only a fedeq run: :func:`check_replaceable`)."""
    path = Path(path)
    if overwrite and check_replaceable(path).is_dir():
        shutil.rmtree(path)
    check_new_run(path).mkdir(parents=True, exist_ok=True)
    return path


class RunRecorder:
    """Collects round and client rows and writes the output folder."""

    def __init__(self, out_dir: str | Path, config_yaml: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(config_yaml)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.curve: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.client_columns: tuple[str, ...] = CLIENT_COLUMNS
        """Columns of ``clients.csv`` (:data:`ASYNC_CLIENT_COLUMNS` in an asynchronous run)."""
        self._clients_on_disk = 0
        """Rows of ``clients.csv`` this recorder wrote, so that a later write appends only the new ones."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the recorder."""
        return {"rounds": self.rounds, "clients": self.clients, "curve": self.curve, "extra": self.extra}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.rounds = list(state["rounds"])
        self.clients = list(state["clients"])
        self.curve = list(state["curve"])
        self.extra = {**state["extra"], **{k: v for k, v in self.extra.items() if k not in state["extra"]}}
        self._clients_on_disk = 0

    def add_round(self, row: Mapping[str, Any], clients: Sequence[Mapping[str, Any]] = ()) -> None:
        self.rounds.append(dict(row))
        self.clients.extend(dict(c) for c in clients)

    def save_partitions(self, sizes: Sequence[int], tiers: Sequence[str]) -> None:
        pd.DataFrame(
            {"partition": range(len(sizes)), "num_examples": list(sizes), "tier": list(tiers)}
        ).to_csv(self.out_dir / "partitions.csv", index=False)

    def rounds_frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rounds)
        cols = [c for c in ROUND_COLUMNS if c in df.columns] + [
            c for c in df.columns if c not in ROUND_COLUMNS
        ]
        return df[cols] if len(df) else pd.DataFrame(columns=list(ROUND_COLUMNS))

    def clients_frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.clients, columns=list(self.client_columns))
        return df

    def _write_clients(self, append: bool) -> None:
        path = self.out_dir / "clients.csv"
        done = self._clients_on_disk
        if append and 0 < done <= len(self.clients) and path.is_file():
            new = pd.DataFrame(self.clients[done:], columns=list(self.client_columns))
            new.to_csv(path, mode="a", header=False, index=False)
        else:
            self.clients_frame().to_csv(path, index=False)
        self._clients_on_disk = len(self.clients)

    def write(
        self, summary: Mapping[str, Any] | None = None, plots: bool = True, append: bool = False
    ) -> None:
        """Write CSVs, ``summary.json`` and (optionally) plots.

        With ``append``, ``clients.csv`` only gains the rows recorded since this recorder last wrote it (the
        cost of a round's write stays flat as a run grows); otherwise every file is rewritten whole.
        """
        rounds = self.rounds_frame()
        rounds.to_csv(self.out_dir / "rounds.csv", index=False)
        self._write_clients(append)
        if self.curve:
            pd.DataFrame(self.curve).to_csv(self.out_dir / "budget_curve.csv", index=False)
        data = {**self.extra, **(summary or {})}
        if len(rounds):
            for col in ("test_acc", *PERSONAL_ROUND_COLUMNS):
                if col in rounds:
                    acc = rounds[col].astype(float)
                    data.update({f"final_{col}": _num(acc.iloc[-1]), f"best_{col}": _num(acc.max())})
            if "test_loss" in rounds:
                data["final_test_loss"] = _num(rounds["test_loss"].iloc[-1])
            data.update(
                rounds_completed=int(rounds["round"].max()),
                total_sim_time_s=_num(rounds["sim_time_s"].fillna(0).sum()),
                total_bytes_up=int(rounds["bytes_up"].sum()),
                total_bytes_down=int(rounds["bytes_down"].sum()),
                clients_ok=int(rounds["clients_ok"].sum()),
                clients_failed=int(rounds["clients_failed"].sum()),
                clients_rejected=int(rounds["clients_rejected"].sum()),
            )
        if self.curve:
            data["budget_curve"] = {str(r["budget"]): _num(r["accuracy"]) for r in self.curve}
        (self.out_dir / "summary.json").write_text(json.dumps(data, indent=2, default=str))
        if plots and len(rounds):
            from fedeq.results.plots import plot_run

            plot_run(self.out_dir)


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
