"""The round book of a personalised run: ``clients.csv`` also holds every client's evaluation."""

from __future__ import annotations

from typing import Any

from fedeq.results.recorder import CLIENT_COLUMNS
from fedeq.server.callbacks.personal import evaluation_entries
from fedeq.server.round_book import RoundBook

__all__ = ["PERSONAL_CLIENT_COLUMNS", "PersonalRoundBook"]

PERSONAL_CLIENT_COLUMNS = (
    *CLIENT_COLUMNS,
    "call",
    "train_mem_bytes",
    "test_examples",
    "personal_acc",
    "personal_loss",
    "global_acc",
)
"""``clients.csv`` of a personalised run."""


class PersonalRoundBook(RoundBook):
    """Train rows as in :class:`RoundBook` (``call=train``, with the call's ``train_mem_bytes``), then one
    ``call=evaluate`` row per client evaluated in the round: its personalised accuracy and loss on its own
    test split and, when the whole model travels, the global model's accuracy there."""

    def client_rows(self, server_round: int) -> list[dict[str, Any]]:
        entries = self.strategy.round_entries(server_round)
        memory = {int(e["node_id"]): e.get("train-mem-bytes") for e in entries}
        return [
            {**row, "call": "train", "train_mem_bytes": memory.get(row["node_id"])}
            for row in super().client_rows(server_round)
        ]

    def extra_columns(self, clients: list[dict[str, Any]]) -> dict[str, Any]:
        """``train_mem_peak_bytes``: the largest training memory of the round's accepted clients
        (:func:`~fedeq.personal.memory.training_memory`)."""
        sizes = [c["train_mem_bytes"] for c in clients if c["status"] == "ok" and c.get("train_mem_bytes")]
        return {"train_mem_peak_bytes": max(sizes) if sizes else None}

    def evaluation_rows(self, server_round: int) -> list[dict[str, Any]]:
        rows = []
        for e in evaluation_entries(self.strategy, server_round):
            tier = e.get("tier")
            rows.append(
                {
                    "round": server_round,
                    "node_id": int(e["node_id"]),
                    "partition": e.get("partition-id"),
                    "tier": self.tier_names[int(tier)] if tier is not None else None,
                    "status": e["status"],
                    "reason": "",
                    "call": "evaluate",
                    "test_examples": e.get("num-examples"),
                    "personal_acc": e.get("personal-acc"),
                    "personal_loss": e.get("personal-loss"),
                    "global_acc": e.get("global-acc"),
                }
            )
        return rows
