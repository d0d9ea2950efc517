"""The node check at the start of a run: enough nodes must be connected, or the run stops with one line.

Flower's strategies wait for ``min_available_nodes`` connected nodes before every round, with no time limit:
a federation of 2 SuperNodes running a config of 20 clients would wait forever. The ServerApp therefore
waits a bounded time (:data:`NODE_WAIT_S`) for the nodes the config needs, then raises
:class:`NodeCheckError` naming the numbers and the fixes.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.serverapp import Grid

__all__ = ["NODE_WAIT_S", "NodeCheckError", "nodes_needed", "wait_for_nodes"]

NODE_WAIT_S = 10.0
"""How long the run waits at its start for the nodes it needs (Flower's simulation registers its SuperNodes
at once; ``fedeq deploy run`` submits once its SuperNodes are connected)."""


class NodeCheckError(RuntimeError):
    """Fewer nodes are connected than the config needs."""


def nodes_needed(cfg: Any) -> int:
    """Connected nodes the first round waits for: ``strategy.min_available_nodes``, else ``num_clients``."""
    return int(cfg.strategy.min_available_nodes or cfg.num_clients)


def _problem(cfg: Any, need: int, connected: int, waited: float) -> str:
    min_nodes = cfg.strategy.min_available_nodes
    setting = f"num_clients={cfg.num_clients}" + (
        f", strategy.min_available_nodes={min_nodes}" if min_nodes is not None else ""
    )
    fewer = f"num_clients={connected} clients_per_round={min(cfg.clients_per_round, connected)}"
    return (
        f"the run needs {need} connected nodes ({setting}) but {connected} connected within {waited:g} s; "
        f'start {need} SuperNodes (flwr run: --federation-config "num-supernodes={need}"; '
        f"fedeq deploy: --nodes {need})" + (f", or run fewer clients: {fewer}" if connected > 0 else "")
    )


def wait_for_nodes(grid: Grid, cfg: Any, timeout_s: float | None = None, poll_s: float = 0.5) -> list[int]:
    """Wait until ``nodes_needed(cfg)`` nodes are connected to ``grid`` and return their ids; after
    ``timeout_s`` (default :data:`NODE_WAIT_S`) raise :class:`NodeCheckError` with a one-line message."""
    need = nodes_needed(cfg)
    timeout = NODE_WAIT_S if timeout_s is None else float(timeout_s)
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= need:
            return nodes
        if time.monotonic() >= deadline:
            raise NodeCheckError(_problem(cfg, need, len(nodes), timeout))
        time.sleep(poll_s)
