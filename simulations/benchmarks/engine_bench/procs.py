"""Memory and CPU time of a process tree (the driver, its Ray cluster and the actors), with psutil."""

from __future__ import annotations

import contextlib
import os
import resource
import threading

import psutil

__all__ = ["PssSampler", "descendants", "self_peak_rss", "tree_cpu", "tree_memory"]

_PEAK_RSS: dict[int, int] = {}
"""Largest RSS (bytes) a running :class:`PssSampler` saw for each pid of the tree."""
_PEAK_LOCK = threading.Lock()


def descendants(root: int) -> list[psutil.Process]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    try:
        return psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def tree_memory(root: int) -> dict[str, float]:
    """Peak and current RSS of ``root``'s descendants: the processes of its local Ray cluster.

    A process's peak is the largest RSS a :class:`PssSampler` saw for it (sampled), and at least its RSS now.
    """
    peaks, current = [], []
    for proc in descendants(root):
        rss = _rss(proc)
        with _PEAK_LOCK:
            peaks.append(max(rss, _PEAK_RSS.get(proc.pid, 0)))
        current.append(rss)
    return {"procs": len(peaks), "peak_sum_bytes": float(sum(peaks)), "rss_sum_bytes": float(sum(current))}


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each live descendant of ``root``."""
    out: dict[int, float] = {}
    for proc in descendants(root):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[proc.pid] = float(times.user + times.system)
    return out


def _pss_and_rss(proc: psutil.Process) -> tuple[int, int]:
    """Proportional set size (shared pages split among the processes that map them) and RSS, in bytes."""
    try:
        info = proc.memory_full_info()
    except psutil.Error:
        return 0, 0
    return int(getattr(info, "pss", info.uss)), int(info.rss)


class PssSampler:
    """Samples the summed PSS of this process and all its descendants every ``interval`` seconds (a
    thread); ``peak`` is the largest total seen: the run's memory, shared libraries counted once. It also
    records each process's largest RSS, which :func:`tree_memory` reports as its peak."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            driver, _ = _pss_and_rss(me)
            total = driver
            for proc in descendants(me.pid):
                pss, rss = _pss_and_rss(proc)
                total += pss
                with _PEAK_LOCK:
                    _PEAK_RSS[proc.pid] = max(rss, _PEAK_RSS.get(proc.pid, 0))
            self.peak, self.peak_driver = max(self.peak, total), max(self.peak_driver, driver)
            self._stop.wait(self.interval)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def self_peak_rss() -> float:
    """This process's peak RSS (bytes), as the kernel counts it."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0
