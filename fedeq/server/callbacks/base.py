"""The hooks the server's round loop calls (:func:`fedeq.server.loop.run_rounds`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Result

__all__ = ["RoundCallback"]


class RoundCallback:
    """One concern of a run (central evaluation, results, console output, checkpoints, ...).

    Every hook does nothing unless a subclass overrides it. The loop calls the callbacks in list order.
    """

    def on_run_start(self, start_round: int, arrays: ArrayRecord) -> None:
        """Before the first round of this process (``start_round > 1`` when a run is resumed)."""

    def on_round_end(self, server_round: int, arrays: ArrayRecord) -> None:
        """In the loop's thread, right after the round's aggregation: capture state of that moment here."""

    def after_round(
        self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """After round ``server_round`` (0: the initial model of a new run), possibly in a background
        thread while the next round trains. ``metrics`` holds what the earlier callbacks returned for this
        round; what this one returns is added to it."""
        return None

    def on_run_end(self, result: Result) -> None:
        """After the last round, with the loop's result (``result.arrays``: the final global model)."""
