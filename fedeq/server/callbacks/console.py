"""One console line per round: accuracy, loss, reply counts and times."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord
from rich.console import Console

from .base import RoundCallback

__all__ = ["ConsoleReport"]


class ConsoleReport(RoundCallback):
    """Print ``round k/N acc .. loss .. ok .. failed .. rejected .. sim ..s wall ..s`` after each round
    (offline and dropped counts when there are any; the clients' personalised accuracy when there is one),
    from the central evaluation and the round's row."""

    def __init__(self, num_rounds: int, console: Console) -> None:
        self.num_rounds = num_rounds
        self.console = console

    def after_round(self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]) -> None:
        if server_round == 0:
            return None
        row = metrics
        extra = "".join(f" {k[8:]} {row[k]}" for k in ("clients_offline", "clients_dropped") if row.get(k))
        accuracy = f"acc {row['test_acc']:.4f} loss {row['test_loss']:.4f} " if "test_acc" in row else ""
        if "personal_acc" in row:
            accuracy += f"personal {row['personal_acc']:.4f} worst10% {row['personal_acc_worst10']:.4f} "
        self.console.print(
            f"[bold]round {server_round:>3}/{self.num_rounds}[/] "
            f"{accuracy}"
            f"ok {row['clients_ok']} failed {row['clients_failed']} "
            f"rejected {row['clients_rejected']}{extra} "
            f"sim {row['sim_time_s']:.2f}s wall {row['wall_s']:.2f}s",
            soft_wrap=True,
        )
        return None
