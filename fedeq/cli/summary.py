"""The closing summary of ``fedeq simulate``: one block built from the run's own records
(:func:`fedeq.results.run_report.read_report`), printed at the end of every run, ``--quiet`` included."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from fedeq.results.run_report import RunReport

__all__ = ["print_summary", "summary_table"]


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_table(report: RunReport) -> Table:
    """The summary block of ``report`` as a rich table."""
    table = Table(
        title="run summary", title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False
    )
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    best = _acc(report.best_test_acc)
    if report.best_round is not None:
        best += f" (round {report.best_round})"
    planned = f" of {report.rounds_planned}" if report.rounds_planned is not None else ""
    session = f", {report.wall_s_session:.1f} s this session" if report.wall_s_session is not None else ""
    calls = ", ".join(f"{s} {n}" for s, n in report.calls.items())
    empty = ", ".join(map(str, report.empty_rounds)) or "none"
    table.add_row("test accuracy", f"final {_acc(report.final_test_acc)}, best {best}")
    if report.final_personal_acc is not None:
        mean, worst = _acc(report.final_personal_acc), _acc(report.final_personal_worst10)
        table.add_row("personalised accuracy", f"final mean {mean}, worst 10% of clients {worst}")
    table.add_row("rounds", f"{report.rounds_done}{planned}")
    table.add_row("wall time", f"{report.wall_s_rounds:.1f} s in rounds{session}")
    table.add_row("simulated time", f"{report.sim_time_s:.2f} s")
    table.add_row("bytes", f"up {decimal(report.bytes_up)}, down {decimal(report.bytes_down)}")
    table.add_row("client calls", calls)
    table.add_row("rounds without update", empty)
    return table


def print_summary(report: RunReport, console: Console | None = None) -> None:
    """Print the summary block of ``report`` and the output folder (to standard output unless ``console``
    says otherwise)."""
    console = console or Console()
    console.print(summary_table(report))
    console.print(f"results written to {report.out_dir}", soft_wrap=True, markup=False, highlight=False)
