"""The simulated devices' own storage: each node's ``context.state``, kept by the engine between calls."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from flwr.app import RecordDict

__all__ = ["NodeStates"]


class NodeStates:
    """``context.state`` of every node that has one, by node id.

    A call takes its node's state and the reply brings it back (:class:`~fedeq.engines.ray.grid.RayGrid`);
    only a call that succeeded replaces it. :meth:`capture` and :meth:`restore` are the checkpoint's view
    (a ``LoopState``), so a resumed run continues with every device's state as it was.
    """

    def __init__(self) -> None:
        self.states: dict[int, RecordDict] = {}

    def get(self, node_id: int) -> RecordDict | None:
        return self.states.get(int(node_id))

    def put(self, node_id: int, state: RecordDict) -> None:
        if len(state) or int(node_id) in self.states:
            self.states[int(node_id)] = state

    def capture(self) -> dict[str, Any]:
        """Every state, pickled now (later calls do not change the capture)."""
        return {
            "states": {n: pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL) for n, s in self.states.items()}
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.states = {int(n): pickle.loads(b) for n, b in dict(state.get("states", {})).items()}
