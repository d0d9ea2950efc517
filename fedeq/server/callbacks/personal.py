"""Personalised accuracy of every round: each client's model on its own test split (``personalization``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord

from fedeq.personal import personal_summary
from strategies.guard import ReplyGuard

from .base import RoundCallback

__all__ = ["PersonalEvaluation", "evaluation_entries"]


def evaluation_entries(guard: ReplyGuard, server_round: int) -> list[dict[str, Any]]:
    """The evaluate replies of ``server_round`` that the guard accepted, in node order."""
    entries = guard.round_entries(server_round, train=False)
    return sorted((e for e in entries if e["status"] == "ok"), key=lambda e: int(e["node_id"]))


class PersonalEvaluation(RoundCallback):
    """``personal_acc`` (mean over the clients of their personalised accuracy), ``personal_acc_worst10``
    (mean of the worst 10% of clients), ``personal_clients`` (clients evaluated) and, when the whole model
    travels, ``global_acc_clients`` (the global model on the same client test splits, mean over clients)."""

    def __init__(self, guard: ReplyGuard) -> None:
        self.guard = guard

    def after_round(
        self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        if server_round == 0:
            return None
        # a client whose partition left no test example has no score
        entries = [e for e in evaluation_entries(self.guard, server_round) if e.get("test-examples", 1)]
        row: dict[str, Any] = personal_summary([float(e["personal-acc"]) for e in entries])
        row["personal_clients"] = len(entries)
        globals_ = [float(e["global-acc"]) for e in entries if "global-acc" in e]
        if globals_:
            row["global_acc_clients"] = sum(globals_) / len(globals_)
        return row
