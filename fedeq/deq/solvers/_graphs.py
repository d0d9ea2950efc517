"""CUDA graphs of the solvers' per-evaluation bookkeeping.

On a GPU the work a solver does between two calls of ``f`` (residual, scores, best candidate, Anderson's
history and small solve, the next iterate) is a few dozen kernels of a few microseconds each: their
launches, not their arithmetic, set its cost, which at DEQ sizes is as much as ``f`` itself. A
:class:`StepGraphs` records the bookkeeping of evaluation ``k`` once as a CUDA graph and replays it with one
launch in every later solve of the same signature; ``f`` always runs eagerly, outside the graphs.

What a step reads and writes lives in buffers owned by the solve signature's state (fixed addresses), so
the graph of step ``k`` is valid for every solve. The first solve of a signature runs its steps eagerly on
the capture stream (a warm-up: library handles and workspaces are created outside any capture), later
solves capture each step the first time they reach it. If a capture fails (an operation that cannot be
captured), the step runs eagerly and the signature never captures again. Off CUDA the same steps run
eagerly on the same buffers (which is how the test suite checks them).

Off by default until it has been measured on GPUs: switch it on with ``FEDEQ_CUDA_GRAPHS=1`` or
:func:`set_cuda_graphs`; ``simulations/benchmarks/gpu_checks.py`` compares it with the eager path there.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["GraphCache", "StepGraphs", "cuda_graphs_enabled", "set_cuda_graphs"]

_enabled = os.environ.get("FEDEQ_CUDA_GRAPHS", "0") == "1"


def cuda_graphs_enabled() -> bool:
    """Whether GPU solves replay their bookkeeping as CUDA graphs (see the module docstring)."""
    return _enabled


def set_cuda_graphs(enabled: bool) -> bool:
    """Switch the CUDA-graph bookkeeping on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


class StepGraphs:
    """The state of one solve signature and the graphs of its steps, keyed by evaluation index."""

    def __init__(self, state: Any, device: torch.device) -> None:
        self.state = state
        self.capture = device.type == "cuda"
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.solves = 0  # solves started; the first one is the warm-up
        self.failed = False
        self._stream = torch.cuda.Stream(device=device) if self.capture else None
        self._pool: Any = None

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        """Run ``step`` (graph-safe: no host reads, no allocation that outlives it) for ``key``."""
        if not self.capture:
            step()
            return
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        current = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            if self.failed or self.solves <= 1:
                step()
            else:
                graph = torch.cuda.CUDAGraph()
                try:
                    graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                    try:
                        step()
                    finally:
                        graph.capture_end()
                except RuntimeError:  # not capturable: eager from now on (nothing ran during capture)
                    self.failed = True
                    graph = None
                    step()
        current.wait_stream(self._stream)
        if graph is not None:
            if self._pool is None:
                self._pool = graph.pool()  # all steps of a signature share one memory pool
            self.graphs[key] = graph
            graph.replay()


class GraphCache:
    """At most ``max_entries`` solve signatures' :class:`StepGraphs`, least recently used dropped first.

    A signature's state serves one solve at a time: :meth:`take` returns ``None`` while it is in use (a
    nested solve of the same signature, or another thread's), and the caller then solves without graphs.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, StepGraphs] = OrderedDict()
        self._busy: set[Hashable] = set()

    def take(self, key: Hashable, make: Callable[[], Any], device: torch.device) -> StepGraphs | None:
        with self._lock:
            if key in self._busy:
                return None
            self._busy.add(key)
            entry = self._entries.pop(key, None)
        if entry is None:
            try:
                with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode
                    entry = StepGraphs(make(), device)
            except BaseException:
                with self._lock:
                    self._busy.discard(key)
                raise
        entry.solves += 1
        return entry

    def give(self, key: Hashable, entry: StepGraphs) -> None:
        with self._lock:
            self._busy.discard(key)
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
