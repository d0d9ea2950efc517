"""The Ray actor that runs the ClientApp for the nodes of one device tier."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import psutil
import ray
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

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


@ray.remote
class ClientWorker:
    """A long-lived process that runs the ClientApp for any node of its tier.

    The run config is sent once, when the actor starts, not with every call.
    """

    def __init__(self, app_ref: str, num_threads: int, run_config: dict | None = None) -> None:
        import importlib

        import torch

        torch.set_num_threads(max(1, num_threads))
        module, _, attr = app_ref.partition(":")
        self.app = getattr(importlib.import_module(module), attr)
        self.run_config = dict(run_config or {})
        self.states: dict[int, RecordDict] = {}
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

    def handle(self, message: Message, node_id: int, node_config: dict, run_id: int) -> Message:
        t0, c0 = time.perf_counter(), time.process_time()
        state = self.states.setdefault(node_id, RecordDict())
        context = Context(
            run_id=run_id, node_id=node_id, node_config=node_config, state=state, run_config=self.run_config
        )
        try:
            return self.app(message, context)
        except Exception as err:  # noqa: BLE001 - a client failure becomes an error reply
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=message
            )
        finally:
            elapsed = time.perf_counter() - t0
            self.calls += 1
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
