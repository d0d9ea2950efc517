"""An engine for tests: fedeq's real ServerApp (``run_server``) and ClientApp over an in-process grid.

It is resumable like ``engine=ray`` and keeps each node's ``context.state`` the way the Ray engine does
(:class:`~fedeq.engines.ray.node_states.NodeStates`). Two hooks for tests, reset by :func:`reset`:

- :data:`SIGNAL_AT` ``{"round": k, "signum": s}``: the first client call whose ``server-round`` is ``k``
  sends signal ``s`` to this process (a kill in the middle of a round or an asynchronous update);
- :data:`TRAFFIC`: every message the grid carries, as ``("sent", instruction)`` and ``("reply", reply)``.

Register it under the engine name a test's config uses, for the length of a test: ``with
registered("my_local"): ...``; :func:`simulate_cli` runs ``fedeq simulate`` in this process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

import clients.client_app as client_app
from fedeq.cli.main import main
from fedeq.engines.base import Engine
from fedeq.engines.ray.grid import NODE_ID_OFFSET
from fedeq.engines.ray.node_states import NodeStates
from fedeq.registry import ENGINES
from fedeq.server.app import run_server
from tests.flwr_helpers import LocalGrid, task_identity

__all__ = ["NODE_ID_OFFSET", "SIGNAL_AT", "TRAFFIC", "InProcessEngine", "registered", "reset", "simulate_cli"]

SIGNAL_AT: dict[str, Any] = {}
"""``{"round": k, "signum": s}``: a client call of round (or asynchronous dispatch) ``k`` sends ``s``."""
TRAFFIC: list[tuple[str, Message]] = []
"""Every message the grid carried: ``("sent", instruction)`` and ``("reply", reply)``."""


def reset() -> None:
    """Clear both hooks."""
    SIGNAL_AT.clear()
    TRAFFIC.clear()


@contextmanager
def registered(name: str) -> Iterator[None]:
    """:class:`InProcessEngine` as engine ``name`` for the block, with both hooks cleared before and after."""
    ENGINES.register(name, InProcessEngine)
    reset()
    try:
        yield
    finally:
        ENGINES.unregister(name)
        reset()


def simulate_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """``fedeq simulate ARGS`` in this process: its exit code, stdout and stderr (``capsys``: pytest's)."""
    code = main(["simulate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _node(pid: int, num_clients: int, states: NodeStates) -> Callable[[Message], Message]:
    node_id = NODE_ID_OFFSET + pid

    def run(message: Message) -> Message:
        rnd = message.content.config_records["config"].get("server-round")
        if SIGNAL_AT and rnd == SIGNAL_AT["round"]:
            signum = SIGNAL_AT["signum"]
            SIGNAL_AT.clear()
            os.kill(os.getpid(), signum)
            time.sleep(1.0)  # the handler raises in this thread before the sleep ends
        config = {"partition-id": pid, "num-partitions": num_clients}
        state = states.get(node_id) or RecordDict()
        context = Context(run_id=1, node_id=node_id, node_config=config, state=state, run_config={})
        TRAFFIC.append(("sent", message))
        reply = client_app.app(message, context)
        TRAFFIC.append(("reply", reply))
        if not reply.has_error():
            states.put(node_id, context.state)
        return reply

    return run


class InProcessEngine(Engine):
    """The ServerApp and ClientApp of every engine, over an in-process grid whose nodes keep their state;
    resumable."""

    supports_resume = True

    def run(self, cfg: Any, out_dir: Path, quiet: bool = False, resume: bool = False) -> None:
        n = cfg.num_clients
        states = NodeStates()
        grid = LocalGrid({NODE_ID_OFFSET + pid: _node(pid, n, states) for pid in range(n)})
        grid.node_states = states  # type: ignore[attr-defined]
        with task_identity(run_id=grid.run.run_id):
            run_server(grid, cfg, out_dir=out_dir, quiet=quiet, resume=resume)
