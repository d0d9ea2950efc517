"""The round book of an asynchronous run: one ``rounds.csv`` row per server update (model version), one
``clients.csv`` row per client reply with its model version, staleness and simulated times."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedeq.server.round_book import RoundBook

__all__ = ["AsyncRoundBook"]


class AsyncRoundBook(RoundBook):
    """A :class:`RoundBook` on the asynchronous clock.

    The loop gives each update its simulated time (:meth:`set_update`: the arrival of the update that
    filled the buffer) and, per reply of the update in the order the guard logged them, its extra columns
    (``dispatch``, ``model_version``, ``staleness``, ``staleness_weight``, ``start_s``, ``arrival_s``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.update_time: dict[int, float] = {}
        self.reply_extras: dict[int, list[dict[str, Any]]] = {}

    def set_update(self, version: int, sim_time: float, extras: list[dict[str, Any]]) -> None:
        """Record that ``version`` was made at simulated time ``sim_time`` from replies with ``extras``."""
        self.update_time[version] = float(sim_time)
        self.reply_extras[version] = list(extras)

    def round_sim_time(
        self, server_round: int, clients: list[dict[str, Any]], counts: Mapping[str, int]
    ) -> float:
        """Simulated seconds since the previous update: this update is made when the reply that filled
        the buffer arrives. The update's reply columns are added to its client rows here."""
        for row, extra in zip(clients, self.reply_extras.pop(server_round, []), strict=False):
            row.update(extra)
        return self.update_time.pop(server_round, self.cum_sim) - self.cum_sim

    def extra_columns(self, clients: list[dict[str, Any]]) -> dict[str, Any]:
        """``staleness_mean`` / ``staleness_max`` over the update's accepted replies."""
        stale = [float(c["staleness"]) for c in clients if c["status"] == "ok" and "staleness" in c]
        return {
            "staleness_mean": sum(stale) / len(stale) if stale else None,
            "staleness_max": max(stale) if stale else None,
        }
