"""The state of a buffered asynchronous run on the simulated clock: the calls in flight, the clock, the
model versions they started from, and the seeded draw of the next client.

A call dispatched at simulated time ``t_s`` whose reply reports a simulated duration ``d``
(:func:`fedeq.devices.clock.reply_sim_time`) arrives at ``t_s + d``; arrivals are taken in the order of
``(arrival time, dispatch index)``, so ties go to the call dispatched first. Everything here is captured
after every server update and restored on ``--resume`` (:meth:`AsyncState.capture`,
:meth:`AsyncState.restore`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

__all__ = ["AsyncState", "Flight"]


@dataclass(frozen=True)
class Flight:
    """One client call: trained on model ``version``, sent at simulated time ``start``, taking ``duration``
    simulated seconds, with its (already computed) ``reply``."""

    dispatch: int
    """1-based index of the call in the run (the tie-breaker, and the call's seed key)."""
    node: int
    version: int
    start: float
    duration: float
    reply: Message

    @property
    def arrival(self) -> float:
        """Simulated time the reply reaches the server: ``start + duration``."""
        return self.start + self.duration

    @property
    def order(self) -> tuple[float, int]:
        """The key arrivals are processed by."""
        return (self.arrival, self.dispatch)


class AsyncState:
    """Server version, simulated clock, calls in flight and the client-sampling RNG of an async run.

    ``bases[v]`` holds the global arrays of version ``v`` (NumPy) while a call in flight started from it.
    """

    def __init__(self, seed: int) -> None:
        self.version = 0
        self.clock = 0.0
        self.dispatched = 0
        self.in_flight: list[Flight] = []
        self.bases: dict[int, dict[str, np.ndarray]] = {}
        self.rng = np.random.default_rng([int(seed), 0xFEDB0F])

    def idle(self, nodes: Iterable[int]) -> list[int]:
        """The nodes of ``nodes`` with no call in flight, in increasing id order."""
        busy = {f.node for f in self.in_flight}
        return sorted(n for n in nodes if n not in busy)

    def pick(self, nodes: Iterable[int]) -> int | None:
        """A uniformly drawn idle node (seeded; ``None`` when every node is busy)."""
        idle = self.idle(nodes)
        if not idle:
            return None
        return idle[int(self.rng.integers(len(idle)))]

    def add(self, flights: Sequence[Flight]) -> None:
        """Put dispatched calls in flight."""
        self.in_flight.extend(flights)

    def pop_arrival(self) -> Flight:
        """Remove and return the call whose reply arrives first (ties: the lower dispatch index); the clock
        moves to its arrival time (never backwards). Raises ``IndexError`` when nothing is in flight."""
        if not self.in_flight:
            raise IndexError("no call in flight")
        first = min(self.in_flight, key=lambda f: f.order)
        self.in_flight.remove(first)
        self.clock = max(self.clock, first.arrival)
        return first

    def prune_bases(self) -> None:
        """Forget the arrays of versions that no call in flight and not the current version use."""
        keep = {f.version for f in self.in_flight} | {self.version}
        for v in [v for v in self.bases if v not in keep]:
            del self.bases[v]

    def capture(self) -> dict[str, Any]:
        """What a checkpoint keeps (replies included: a resumed run needs no client call repeated)."""
        return {
            "version": self.version,
            "clock": self.clock,
            "dispatched": self.dispatched,
            "in_flight": list(self.in_flight),
            "bases": dict(self.bases),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`capture`."""
        self.version = int(state["version"])
        self.clock = float(state["clock"])
        self.dispatched = int(state["dispatched"])
        self.in_flight = list(state["in_flight"])
        self.bases = dict(state["bases"])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
