"""What the sections share: the long-format report, its tables, medians, the targets, the machine line."""

from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path
from typing import Any

TARGETS = {
    "per_call_ms": 2.0,
    "round_floor_ms": 50.0,
    "efficiency": 0.90,
    "peak_rss_gb": 3.0,
    "start_s": 15.0,
}
"""The numbers each section is measured against."""


def median(xs: list[float]) -> float:
    """The median of ``xs`` (NaN when empty)."""
    return float(statistics.median(xs)) if xs else float("nan")


class Report:
    """Every number of a benchmark run, in long format (section, engine, metric, value, unit, detail)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, engine: str, metric: str, value: float, unit: str, detail: str = "") -> None:
        self.rows.append(
            {
                "section": section,
                "engine": engine,
                "metric": metric,
                "value": value,
                "unit": unit,
                "detail": detail,
            }
        )

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["section", "engine", "metric", "value", "unit", "detail"])
            writer.writeheader()
            writer.writerows(self.rows)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def quiet_logs() -> None:
    import logging

    for name in ("flwr", "ray", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine_line() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
