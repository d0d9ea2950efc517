"""One engine, one config, in a fresh process: run ``fedeq.engines.simulate.simulate`` and measure it.

The round loop's grid (fedeq's ``RayGrid`` or Flower's, whichever engine runs) is instrumented from outside:
at the start and the end of every train ``send_and_receive`` the probe records the wall clock, this
process's CPU time and the CPU time of every process below it (Ray's own processes and the actors). At the
end of the round loop, before the engine shuts down, it reads each process's peak RSS as the kernel counts
it (``VmHWM``) and, on fedeq's engine, ``grid.actor_stats()``.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

from engine_bench.procs import PssSampler, descendants, tree_cpu

__all__ = ["RoundProbe", "child_run", "peak_rss"]


def peak_rss(pid: int) -> int:
    """Peak resident memory of process ``pid`` in bytes (``VmHWM`` of ``/proc/PID/status``; 0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _title(proc: Any) -> str:
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - a process that just exited
        return ""
    return str(cmd[0]) if cmd else ""


def _is_worker(title: str) -> bool:
    """A Ray worker process that hosts an actor (not Ray's agents, not an idle worker)."""
    return title.startswith("ray::") and "Agent" not in title and "IDLE" not in title


class RoundProbe:
    """Wraps ``fedeq.server.app.run_rounds`` so that the grid it gets is measured (any engine)."""

    def __init__(self) -> None:
        self.snaps: list[dict[str, Any]] = []
        """At the start (``"start"``) and end (``"end"``) of every train round's ``send_and_receive``."""
        self.actor_stats: list[dict[str, Any]] | None = None
        self.processes: list[dict[str, Any]] = []

    def snap(self, kind: str) -> None:
        self.snaps.append(
            {
                "kind": kind,
                "t": time.perf_counter(),
                "driver_cpu": time.process_time(),
                "tree_cpu": {str(pid): cpu for pid, cpu in tree_cpu(os.getpid()).items()},
            }
        )

    def install(self) -> None:
        from flwr.app import Message, MessageType

        import fedeq.server.app as server_app

        inner = server_app.run_rounds

        def run_rounds(strategy: Any, grid: Any, arrays: Any, num_rounds: int, **kwargs: Any) -> Any:
            send = grid.send_and_receive

            def probe(messages: Any, *, timeout: float | None = None) -> Any:
                msgs: list[Message] = list(messages)
                train = bool(msgs) and msgs[0].metadata.message_type == MessageType.TRAIN
                if train:
                    self.snap("start")
                replies = send(msgs, timeout=timeout)
                if train:
                    self.snap("end")
                return replies

            grid.send_and_receive = probe
            try:
                return inner(strategy, grid, arrays, num_rounds, **kwargs)
            finally:
                self._finish(grid)

        server_app.run_rounds = run_rounds

    def _finish(self, grid: Any) -> None:
        stats = getattr(grid, "actor_stats", None)
        if callable(stats):
            self.actor_stats = stats()
        for proc in descendants(os.getpid()):
            self.processes.append({"pid": proc.pid, "title": _title(proc), "peak_rss": peak_rss(proc.pid)})


def _cpu_window(snaps: list[dict[str, Any]], actors: set[str] | None = None) -> dict[str, float]:
    """CPU seconds of the driver, of every process below it and of the ``actors`` (pids) among them, from
    the second train round's dispatch to the last train round's replies (all rounds when there is only
    one)."""
    starts = [s for s in snaps if s["kind"] == "start"]
    ends = [s for s in snaps if s["kind"] == "end"]
    first = starts[1] if len(starts) > 1 else starts[0]
    last = ends[-1]
    pids = set(first["tree_cpu"]) | set(last["tree_cpu"])
    below = sum(max(0.0, last["tree_cpu"].get(p, 0.0) - first["tree_cpu"].get(p, 0.0)) for p in pids)
    mine = set(actors or ()) & pids
    workers = sum(max(0.0, last["tree_cpu"].get(p, 0.0) - first["tree_cpu"].get(p, 0.0)) for p in mine)
    driver = last["driver_cpu"] - first["driver_cpu"]
    return {
        "wall_s": last["t"] - first["t"],
        "driver_cpu_s": driver,
        "children_cpu_s": below,
        "actors_cpu_s": workers,
    }


def _cohorts(clients: Any) -> list[dict[str, float]]:
    """Per round: train calls that answered clients (clients of one tier with the same ``compute_cpu_s``
    and ``compute_s`` were trained by one call: a cohort divides its time evenly) and the largest one."""
    out = []
    ok = clients[clients.status == "ok"]
    for rnd, rows in ok.groupby("round"):
        sizes = rows.groupby(["tier", "compute_s", "compute_cpu_s"]).size()
        out.append({"round": int(rnd), "calls": int(len(sizes)), "largest": int(sizes.max())})
    return out


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["overrides"]`` on ``spec["engine"]`` (``ray`` or ``flower``) and return its measurements."""
    import pandas as pd

    from fedeq.config import load_config
    from fedeq.engines.simulate import simulate

    t0 = time.perf_counter()
    out = Path(spec["out"])
    cfg = load_config(None, [*spec["overrides"], f"engine={spec['engine']}", f"output_dir={out.parent}"])
    probe = RoundProbe()
    probe.install()
    sampler = PssSampler() if spec.get("pss") else None
    if sampler is not None:
        with sampler:
            simulate(cfg, quiet=True, out_dir=out)
    else:
        simulate(cfg, quiet=True, out_dir=out)
    rounds = pd.read_csv(out / "rounds.csv")
    clients = pd.read_csv(out / "clients.csv")
    train_cpu = clients.groupby("round").compute_cpu_s.sum(min_count=0).reindex(rounds["round"], fill_value=0)
    actor_pids = {int(st["pid"]) for st in probe.actor_stats or []}
    actors = [
        p for p in probe.processes if p["pid"] in actor_pids or (not actor_pids and _is_worker(p["title"]))
    ]
    return {
        "engine": spec["engine"],
        "round_wall_s": [float(x) for x in rounds.wall_s],
        "clients_ok": [int(x) for x in rounds.clients_ok],
        "train_cpu_s": [float(x) for x in train_cpu],
        "cohorts": _cohorts(clients),
        "cpu": _cpu_window(probe.snaps, {str(p["pid"]) for p in actors}),
        "cores": os.cpu_count() or 1,
        "actor_peak_rss": [p["peak_rss"] for p in actors],
        "all_peak_rss": sum(p["peak_rss"] for p in probe.processes),
        "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_pss": sampler.peak if sampler is not None else None,
        "processes": len(probe.processes),
        "run_s": time.perf_counter() - t0,
    }
