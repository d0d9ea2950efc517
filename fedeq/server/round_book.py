"""The round book: turns the reply guard's per-reply log into rows of ``rounds.csv`` and ``clients.csv``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from fedeq.devices.clock import reply_sim_time
from fedeq.results.recorder import RunRecorder
from strategies.guard import ReplyGuard

__all__ = ["RoundBook"]


class RoundBook:
    """Rows of one run's rounds and client calls, with the simulated clock of the run.

    ``devices`` is ``cfg.devices`` as :func:`~fedeq.config.attribute_view` (read per reply); ``node_config``
    gives the partition and tier of a node whose call failed (its reply carries no metrics).
    """

    def __init__(
        self,
        devices: Any,
        strategy: ReplyGuard,
        model_bytes: int,
        recorder: RunRecorder,
        node_config: Callable[[int], Mapping[str, Any]] | None = None,
    ) -> None:
        self.node_config = node_config
        self.strategy = strategy
        self.model_bytes = model_bytes
        self.recorder = recorder
        self.devices = devices
        self.tier_names = [t.name for t in self.devices.tiers]
        self.cum_sim = 0.0
        """Simulated seconds of the rounds closed so far (checkpointed)."""
        self.t_last = time.perf_counter()
        """When the last round closed (its ``wall_s`` runs from here)."""

    def client_rows(self, server_round: int) -> list[dict[str, Any]]:
        """One ``clients.csv`` row per train reply of ``server_round``."""
        log = self.strategy.round_entries(server_round)
        inner = self.strategy.strategy
        quality = getattr(inner, "last_quality", {})
        rows = []
        for e in log:
            tier_idx = e.get("tier")
            partition = e.get("partition-id")
            if tier_idx is None and self.node_config is not None:  # failed calls carry no metrics
                info = self.node_config(int(e["node_id"]))
                partition = info.get("partition-id")
                tier_idx = (
                    self.tier_names.index(info["tier"]) if info.get("tier") in self.tier_names else None
                )
            tier = self.devices.tiers[int(tier_idx)] if tier_idx is not None else None
            sim = None
            if tier is not None and e["status"] in ("ok", "dropped"):
                sim = reply_sim_time(tier, e, self.model_bytes, self.devices.nfe_cost_s)
            node = int(e["node_id"])
            ok = e["status"] == "ok"
            rows.append(
                {
                    "round": server_round,
                    "node_id": node,
                    "partition": partition,
                    "tier": tier.name if tier is not None else None,
                    "num_examples": e.get("num-examples"),
                    "quality": quality.get(node) if ok else None,
                    "weight": e.get("weight") if ok else 0.0,
                    "residual": e.get("fp-residual"),
                    "nfe_fwd": e.get("nfe-fwd"),
                    "nfe_bwd": e.get("nfe-bwd"),
                    "train_loss": e.get("train-loss"),
                    "val_loss": e.get("val-loss"),
                    "compute_s": e.get("compute-s"),
                    "compute_cpu_s": e.get("compute-cpu-s"),
                    "sim_time_s": sim,
                    "status": e["status"],
                    "reason": e.get("reason") or "",
                }
            )
        return rows

    def close_round(self, server_round: int, evals: Mapping[str, Any]) -> dict[str, Any]:
        """Record the ``rounds.csv`` row of ``server_round`` (with ``evals``) and its client rows; return
        the round's row."""
        clients = self.client_rows(server_round)
        counts = self.strategy.round_counts.get(server_round, {})
        sim = self.round_sim_time(server_round, clients, counts)
        self.cum_sim += sim
        now = time.perf_counter()
        n_sent = len(clients) - int(counts.get("offline", 0))
        n_ok = int(counts.get("ok", 0))
        row = {
            "round": server_round,
            "wall_s": now - self.t_last,
            "sim_time_s": sim,
            "cum_sim_time_s": self.cum_sim,
            **evals,
            "bytes_up": n_ok * self.model_bytes,
            "bytes_down": n_sent * self.model_bytes,
            "clients_ok": n_ok,
            "clients_failed": int(counts.get("failed", 0)),
            "clients_rejected": int(counts.get("rejected", 0)),
            "clients_offline": int(counts.get("offline", 0)),
            "clients_dropped": int(counts.get("dropped", 0)),
            **self.extra_columns(clients),
        }
        self.t_last = now
        self.recorder.add_round(row, clients + self.evaluation_rows(server_round))
        return row

    def round_sim_time(
        self, server_round: int, clients: list[dict[str, Any]], counts: Mapping[str, int]
    ) -> float:
        """Simulated seconds of a synchronous round: its slowest accepted client, or the deadline when the
        server closed the round there."""
        sims = [c["sim_time_s"] for c in clients if c["status"] == "ok" and c["sim_time_s"] is not None]
        sim = max(sims) if sims else 0.0
        deadline = self.devices.deadline_s
        if deadline is not None and (counts.get("dropped", 0) or sim > deadline):
            sim = deadline  # the server closes the round at the deadline
        return sim

    def evaluation_rows(self, server_round: int) -> list[dict[str, Any]]:
        """Further ``clients.csv`` rows of a round, after its train rows (none here)."""
        return []

    def extra_columns(self, clients: list[dict[str, Any]]) -> dict[str, Any]:
        """Further ``rounds.csv`` columns of a round from its client rows (none here)."""
        return {}
