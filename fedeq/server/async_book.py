"""The round book of an asynchronous run: one ``rounds.csv`` row per server update (model version), one
``clients.csv`` row per client reply with its model version, staleness and simulated times."""

from __future__ import annotations

import time
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

    def close_round(self, server_round: int, evals: Mapping[str, Any]) -> dict[str, Any]:
        """Record the row of update ``server_round``: ``sim_time_s`` is the simulated time since the previous
        update, ``cum_sim_time_s`` the time of this one; ``staleness_mean``/``staleness_max`` are over its
        accepted replies."""
        clients = self.client_rows(server_round)
        extras = self.reply_extras.pop(server_round, [])
        for row, extra in zip(clients, extras, strict=False):
            row.update(extra)
        t = self.update_time.pop(server_round, self.cum_sim)
        sim, self.cum_sim = t - self.cum_sim, t
        counts = self.strategy.round_counts.get(server_round, {})
        stale = [float(c["staleness"]) for c in clients if c["status"] == "ok" and "staleness" in c]
        now = time.perf_counter()
        n_sent = len(clients) - int(counts.get("offline", 0))
        n_ok = int(counts.get("ok", 0))
        row = {
            "round": server_round,
            "wall_s": now - self.t_last,
            "sim_time_s": sim,
            "cum_sim_time_s": t,
            **evals,
            "bytes_up": n_ok * self.model_bytes,
            "bytes_down": n_sent * self.model_bytes,
            "clients_ok": n_ok,
            "clients_failed": int(counts.get("failed", 0)),
            "clients_rejected": int(counts.get("rejected", 0)),
            "clients_offline": int(counts.get("offline", 0)),
            "clients_dropped": int(counts.get("dropped", 0)),
            "staleness_mean": sum(stale) / len(stale) if stale else None,
            "staleness_max": max(stale) if stale else None,
        }
        self.t_last = now
        self.recorder.add_round(row, clients)
        return row
