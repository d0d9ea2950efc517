"""A ``Grid`` that stops waiting for replies once its run is stopped.

Flower's simulation runtime runs the ServerApp in a thread of its own. When the main thread is interrupted
(Ctrl-C, SIGTERM), the runtime stops its clients and returns, but the ServerApp thread would go on waiting for
replies that never come, until the round's timeout, and keep the process alive. Over a
:class:`StoppableGrid` it raises :class:`RunStopped` instead: its round loop ends the way it does on any error
(the round in progress is dropped, the last completed round's checkpoint is complete) and the thread exits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

__all__ = ["RunStopped", "StoppableGrid", "stoppable_server_app"]


class RunStopped(RuntimeError):
    """Raised in the ServerApp's thread when its run was stopped while it waited for replies."""


class StoppableGrid(Grid):
    """``grid``, whose :meth:`send_and_receive` raises :class:`RunStopped` once ``stop`` is set."""

    def __init__(self, grid: Grid, stop: threading.Event, poll_s: float = 0.1) -> None:
        self.grid = grid
        self.stop = stop
        self.poll_s = poll_s

    @property
    def run(self) -> Run:
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; collect their replies until all are in or ``timeout`` passes (raises
        :class:`RunStopped` once the run is stopped)."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            if self.stop.wait(self.poll_s):
                raise RunStopped("the run was stopped while waiting for replies")
        return replies


def stoppable_server_app(cfg: Any, out_dir: Path, quiet: bool, stop: threading.Event) -> ServerApp:
    """The ServerApp of ``cfg`` (:func:`fedeq.server.app.run_server`) over a :class:`StoppableGrid`."""
    from fedeq.server.app import run_server

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        run_server(StoppableGrid(grid, stop), cfg, out_dir=out_dir, quiet=quiet)

    return app
