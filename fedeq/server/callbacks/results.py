"""The run's records and output files: rows of every round, files after every round and at the end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Result

from fedeq.arrays import record_to_state_dict
from fedeq.results.plots import plot_run
from fedeq.results.recorder import RunRecorder
from fedeq.server.round_book import RoundBook

from .base import RoundCallback

__all__ = ["ResultsWriter", "RoundRecords"]


class RoundRecords(RoundCallback):
    """Close each round in the :class:`RoundBook`: its ``rounds.csv`` row (with the metrics so far, e.g. the
    central evaluation's) and its ``clients.csv`` rows. Returns the round's row.

    Round 0 (the initial model) has no client calls: its numbers go to ``summary.json`` as ``initial_eval``,
    where the plots find them."""

    def __init__(self, book: RoundBook) -> None:
        self.book = book

    def after_round(
        self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        if server_round == 0:
            numbers = {k: v for k, v in metrics.items() if type(v) in (int, float)}
            self.book.recorder.extra["initial_eval"] = numbers
            self.book.t_last = time.perf_counter()  # round 1's wall time starts after the initial evaluation
            return None
        return self.book.close_round(server_round, dict(metrics))


class ResultsWriter(RoundCallback):
    """Bring the output folder up to date after every round (plots only at the end); at the end of the run
    write ``global_model.pt`` and every file whole, with the run's wall time in ``summary.json``, then the
    plots (:func:`fedeq.results.plots.plot_run`, from the files just written)."""

    def __init__(self, recorder: RunRecorder, out_dir: Path) -> None:
        self.recorder = recorder
        self.out_dir = Path(out_dir)
        self.t0 = time.perf_counter()

    def on_run_start(self, start_round: int, arrays: ArrayRecord) -> None:
        self.t0 = time.perf_counter()

    def after_round(self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]) -> None:
        if server_round > 0:
            self.recorder.write(plots=False, append=True)
        return None

    def on_run_end(self, result: Result) -> None:
        torch.save(record_to_state_dict(result.arrays), self.out_dir / "global_model.pt")
        summary = {"wall_s": time.perf_counter() - self.t0, "output_dir": str(self.out_dir)}
        self.recorder.write(summary=summary, plots=False)
        plot_run(self.out_dir)
