"""The Ray actor that runs the ClientApp for the nodes of one device tier."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import psutil
import ray
from flwr.app import Context, Message, RecordDict

from fedeq.devices.faults import exception_reply

__all__ = ["ClientWorker", "process_memory"]


def process_memory() -> dict[str, int | None]:
    """This process's resident memory now and at its peak (bytes; ``None`` where unknown)."""
    try:
        rss: int | None = int(psutil.Process().memory_info().rss)
    except psutil.Error:
        rss = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_bytes = int(peak if sys.platform == "darwin" else peak * 1024)
    return {"rss_bytes": rss, "peak_rss_bytes": peak_bytes or None}


def _load(ref: str) -> Any:
    """The object that a ``module:attribute`` reference names."""
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@ray.remote
class ClientWorker:
    """A long-lived process that runs the ClientApp for any node of its tier.

    The run config is sent once, when the actor starts, not with every call. A node's ``context.state``
    comes with each call and goes back with its reply: the grid keeps it (any actor of the pool may serve
    the node next time, and the grid checkpoints it with the run).
    """

    def __init__(
        self, app_ref: str, num_threads: int, run_config: dict | None = None, cohort_ref: str | None = None
    ) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.app = _load(app_ref)
        self.cohort = _load(cohort_ref) if cohort_ref else None
        self.run_config = dict(run_config or {})
        self.calls = 0
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self.first_call_s: float | None = None

    def ready(self) -> bool:
        return True

    def setup(self, setup: tuple[Any, tuple]) -> Any:
        """Run ``function(*args)`` of a picklable ``(function, args)`` pair in this process."""
        function, args = setup
        return function(*args)

    def _context(self, node_id: int, node_config: dict, run_id: int, state: RecordDict | None) -> Context:
        return Context(
            run_id=run_id,
            node_id=node_id,
            node_config=node_config,
            state=state if state is not None else RecordDict(),
            run_config=self.run_config,
        )

    def _run_app(self, message: Message, context: Context) -> Message:
        try:
            return self.app(message, context)
        except Exception as err:  # noqa: BLE001 - a client failure becomes an error reply
            return exception_reply(message, err)

    def handle(
        self, message: Message, node_id: int, node_config: dict, run_id: int, state: RecordDict | None = None
    ) -> tuple[Message, RecordDict]:
        """The reply to ``message`` and the node's state after the call."""
        t0, c0 = time.perf_counter(), time.process_time()
        context = self._context(node_id, node_config, run_id, state)
        try:
            return self._run_app(message, context), context.state
        finally:
            self._count(1, t0, c0)

    def handle_cohort(
        self,
        messages: list[Message],
        node_ids: list[int],
        node_configs: list[dict],
        run_id: int,
        states: list[RecordDict | None] | None = None,
    ) -> tuple[list[Message], list[RecordDict]]:
        """Answer several train messages of one tier with the cohort handler (``cohort_ref``); if it
        raises, every message gets the error reply. Returns the replies and the nodes' states."""
        t0, c0 = time.perf_counter(), time.process_time()
        states = states if states is not None else [None] * len(messages)
        contexts = [
            self._context(n, c, run_id, s) for n, c, s in zip(node_ids, node_configs, states, strict=True)
        ]
        after = [c.state for c in contexts]
        try:
            if self.cohort is None:
                return [self._run_app(m, c) for m, c in zip(messages, contexts, strict=True)], after
            try:
                return list(self.cohort(messages, contexts, self._run_app)), after
            except Exception as err:  # noqa: BLE001 - a failure of the cohort becomes error replies
                return [exception_reply(m, err) for m in messages], after
        finally:
            self._count(len(messages), t0, c0)

    def _count(self, calls: int, t0: float, c0: float) -> None:
        elapsed = time.perf_counter() - t0
        self.calls += calls
        self.busy_s += elapsed
        self.cpu_s += time.process_time() - c0
        if self.first_call_s is None:
            self.first_call_s = elapsed

    def stats(self) -> dict[str, Any]:
        """Calls served, wall and CPU seconds spent inside the ClientApp, this process's memory (bytes)."""
        return {
            "pid": os.getpid(),
            "calls": self.calls,
            "busy_s": self.busy_s,
            "cpu_s": self.cpu_s,
            "first_call_s": self.first_call_s,
            **process_memory(),
        }
