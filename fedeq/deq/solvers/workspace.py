"""Solver buffers kept between solves on the CPU.

A buffer of several megabytes allocated afresh on every solve costs a page fault per 4 KiB page on its
first touch, because the C allocator hands large freed blocks back to the operating system; at the sizes
of a DEQ layer that is as much time as the solver's own arithmetic. Other devices have caching
allocators, so only CPU states are kept.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

Tensor = torch.Tensor


class Workspace:
    """A pool of solver states (buffers and the views a solver uses), taken by key and given back.

    Each state is owned by one solve at a time and a lock guards the pool, so concurrent and nested solves
    get distinct ones. A state that a returned object still refers to (Broyden's factors) is *lent*: it is
    reused only once that object is gone. At most ``max_bytes`` of idle states are kept, least recently
    used dropped first. ``enabled = False`` makes every solve allocate its own buffers.
    """

    def __init__(self, max_bytes: int, max_lent: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_lent = max_lent
        self.enabled = True
        self._lock = threading.Lock()
        self._idle: list[tuple[Hashable, Any, int]] = []
        self._lent: list[tuple[Hashable, Any, int, weakref.ref]] = []

    def keeps(self, like: Tensor) -> bool:
        """Whether states for tensors like ``like`` are pooled (CPU tensors, while enabled)."""
        return self.enabled and like.device.type == "cpu"

    def take(self, key: Hashable, like: Tensor, make: Callable[[], Any]) -> Any:
        """An idle state stored under ``key``, else ``make()`` (always ``make()`` off the CPU)."""
        if self.keeps(like):
            with self._lock:
                for i in range(len(self._idle) - 1, -1, -1):
                    if self._idle[i][0] == key:
                        return self._idle.pop(i)[1]
                for i, (k, obj, _, user) in enumerate(self._lent):
                    if k == key and user() is None:
                        del self._lent[i]
                        return obj
        with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode later
            return make()

    def give(self, key: Hashable, like: Tensor, obj: Any, nbytes: int, user: Any = None) -> None:
        """Store ``obj`` for reuse; with ``user`` it is lent until ``user`` is garbage collected."""
        if not self.keeps(like) or nbytes > self.max_bytes:
            return
        with self._lock:
            if user is not None:
                self._lent.append((key, obj, nbytes, weakref.ref(user)))
                del self._lent[: -self.max_lent]
                return
            self._idle.append((key, obj, nbytes))
            total = 0
            for i in range(len(self._idle) - 1, -1, -1):
                total += self._idle[i][2]
                if total > self.max_bytes:
                    del self._idle[: i + 1]
                    break

    def clear(self) -> None:
        """Drop every kept state."""
        with self._lock:
            self._idle.clear()
            self._lent.clear()


WORKSPACE = Workspace(max_bytes=64 * 2**20)
"""The process's pool (at most 64 MiB of idle states)."""
