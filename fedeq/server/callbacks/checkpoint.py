"""Checkpoints after every round, and resuming a run from the last one (:mod:`fedeq.results.checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord

from fedeq.arrays import record_from_numpy, record_to_numpy
from fedeq.results.checkpoint import (
    Journal,
    journaled_lists,
    load_checkpoint,
    restore_strategy,
    rng_state,
    save_checkpoint,
    set_rng_state,
    snapshot_strategy,
)
from fedeq.results.recorder import RunRecorder
from fedeq.server.round_book import RoundBook
from strategies.guard import ReplyGuard

from .base import RoundCallback

__all__ = ["Checkpointing", "LoopState"]


class LoopState(Protocol):
    """State of a round loop beyond the strategy's (e.g. the asynchronous loop's calls in flight)."""

    def capture(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


def _owned_by(lists: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The journaled lists named ``"<owner>.<attribute>"``, by attribute."""
    parts = {name: name.partition(".") for name in lists}
    return {attr: lists[name] for name, (who, _, attr) in parts.items() if who == owner}


class Checkpointing(RoundCallback):
    """Write ``checkpoint.pkl`` and the round's ``checkpoint.journal`` record after every round.

    The strategy and the RNG states are captured at the round's end, before the next round touches them;
    the checkpoint is written once the round's results are recorded (so this callback comes last). A
    ``loop`` state (the asynchronous loop's) and ``node_states`` (the engine's store of the devices'
    ``context.state``, :class:`~fedeq.engines.ray.node_states.NodeStates`) are captured at the round's end
    too and restored by :meth:`resume`.
    """

    def __init__(
        self,
        out_dir: Path,
        strategy: ReplyGuard,
        recorder: RunRecorder,
        book: RoundBook,
        loop: LoopState | None = None,
        node_states: LoopState | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.strategy = strategy
        self.recorder = recorder
        self.book = book
        self.loop = loop
        self.extra_states = {"loop": loop, "node_states": node_states}
        self.journal = Journal(self.out_dir)
        self._captured: dict[int, tuple[bytes, dict[str, list[Any]], dict[str, int], dict[str, Any]]] = {}
        self._extra: dict[int, dict[str, dict[str, Any]]] = {}

    def start_fresh(self) -> None:
        """Forget a journal left in a reused output folder by an earlier run."""
        self.journal.path.unlink(missing_ok=True)

    def resume(self) -> tuple[int, ArrayRecord]:
        """Restore the strategy, the recorder, the clock and the RNGs of the last checkpoint; return its round
        and global arrays."""
        state = load_checkpoint(self.out_dir)
        restore_strategy(self.strategy, state["strategy"])
        # Checkpoints written before the journal kept these lists whole in checkpoint.pkl: no "journal" key.
        lists = state.get("journal", {})
        for attr, items in _owned_by(lists, "strategy").items():
            setattr(self.strategy, attr, items)
        self.recorder.restore({**state["recorder"], **_owned_by(lists, "recorder")})
        self.journal.lengths = {name: len(items) for name, items in lists.items()}
        self.book.cum_sim = state["cum_sim"]
        set_rng_state(state["rng"])
        if self.loop is not None and "loop" not in state:
            raise ValueError(f"--resume: {self.out_dir} was not checkpointed by this kind of run")
        for key, holder in self.extra_states.items():
            if holder is not None and key in state:
                holder.restore(state[key])
        return int(state["round"]), record_from_numpy(state["arrays"])

    def on_round_end(self, server_round: int, arrays: ArrayRecord) -> None:
        snapshot = snapshot_strategy(self.strategy)
        lists = journaled_lists(self.strategy)
        tails = self.journal.take({f"strategy.{k}": v for k, v in lists.items()})
        lengths = {name: self.journal.lengths[name] for name in tails}
        self._captured[server_round] = (snapshot, tails, lengths, rng_state())
        self._extra[server_round] = {
            key: holder.capture() for key, holder in self.extra_states.items() if holder is not None
        }

    def after_round(self, server_round: int, arrays: ArrayRecord, metrics: Mapping[str, Any]) -> None:
        if server_round not in self._captured:  # round 0: the initial model, nothing to keep
            return None
        snapshot, tails, lengths, rng = self._captured.pop(server_round)
        rec = self.recorder.state()
        rows = {"recorder.rounds": rec.pop("rounds"), "recorder.clients": rec.pop("clients")}
        tails.update(self.journal.take(rows))
        lengths.update({name: self.journal.lengths[name] for name in rows})
        self.journal.append(server_round, tails)
        state = {
            "round": server_round,
            "arrays": record_to_numpy(arrays),
            "strategy": snapshot,
            "recorder": rec,
            "cum_sim": self.book.cum_sim,
            "rng": rng,
            "journal": lengths,
        }
        state.update(self._extra.pop(server_round, {}))
        save_checkpoint(self.out_dir, state)
        return None
