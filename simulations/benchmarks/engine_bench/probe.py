"""Instruments ``run_ray_simulation`` from outside (phases, per-round grid time, actors, memory)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from engine_bench.procs import tree_cpu, tree_memory


class Probe:
    """Instruments ``run_ray_simulation`` from outside: phase timestamps, per-round grid time and actor
    stats, and the memory of the driver's process tree taken just before the grid shuts down."""

    def __init__(self, pipeline: int | None = None, share_partitions: bool = True) -> None:
        self.pipeline = pipeline
        self.share_partitions = share_partitions
        self.marks: dict[str, float] = {}
        self.cpu_marks: dict[str, float] = {}
        self.eval_before_dispatch_s = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.grid: Any = None
        self.final_stats: list[dict[str, Any]] = []
        self.tree: dict[str, float] = {}
        self.snaps: list[dict[str, Any]] = []
        """At each train dispatch and at the end: wall clock, driver CPU, CPU of every descendant."""

    def snap(self) -> None:
        self.snaps.append(
            {"t": time.perf_counter(), "driver_cpu": time.process_time(), "tree_cpu": tree_cpu(os.getpid())}
        )

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.time())
        self.cpu_marks.setdefault(name, time.process_time())

    def install(self) -> None:
        import fedeq.engines.ray.engine as engine
        import fedeq.server.callbacks.evaluation as server

        make_grid, share, evaluate = engine.make_grid, engine.share_partitions, server.evaluate

        def evaluate_probe(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return evaluate(*args, **kwargs)
            finally:
                if "first_dispatch" not in self.marks:
                    self.eval_before_dispatch_s += time.perf_counter() - t0

        server.evaluate = evaluate_probe

        def make_grid_probe(cfg: Any) -> Any:
            self.mark("make_grid_start")
            grid = make_grid(cfg)
            if self.pipeline is not None:
                grid.pipeline = self.pipeline
            self.mark("grid_built")
            self._wrap(grid)
            return grid

        def share_probe(grid: Any, cfg: Any, data: Any = None) -> None:
            # The engine loads and partitions in a thread while Ray starts: this phase is what is left.
            self.mark("partition_start")
            if self.share_partitions:
                share(grid, cfg, data)
            self.mark("partitions_shared")

        engine.make_grid, engine.share_partitions = make_grid_probe, share_probe

    def _wrap(self, grid: Any) -> None:
        self.grid = grid
        send, wait_ready, shutdown = grid.send_and_receive, grid.wait_ready, grid.shutdown

        def wait_ready_probe() -> None:
            wait_ready()
            self.mark("actors_ready")

        def send_probe(messages: Any, *, timeout: float | None = None) -> Any:
            messages = list(messages)
            if not messages:
                return send(messages, timeout=timeout)
            self.mark("first_dispatch")
            self.snap()
            t0 = time.perf_counter()
            replies = send(messages, timeout=timeout)
            wall = time.perf_counter() - t0
            self.mark("first_round_done")
            self.rounds.append({"messages": len(messages), "wall_s": wall, "actors": grid.actor_stats()})
            return replies

        def shutdown_probe() -> None:
            self.mark("end")
            self.snap()
            self.final_stats = grid.actor_stats()
            self.tree = tree_memory(os.getpid())
            shutdown()

        grid.send_and_receive, grid.wait_ready, grid.shutdown = send_probe, wait_ready_probe, shutdown_probe


def run_probed(cfg: Any, out: Path, spec: dict[str, Any]) -> Probe:
    from fedeq.engines.ray.engine import run_ray_simulation

    probe = Probe(spec.get("pipeline"), spec.get("share_partitions", True))
    probe.install()
    run_ray_simulation(cfg, out, quiet=True)
    return probe
