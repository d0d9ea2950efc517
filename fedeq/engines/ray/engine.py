"""Run a fedeq config on the Ray device engine (:class:`fedeq.engines.ray.grid.RayGrid`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedeq.config import to_run_config
from fedeq.data import client_dataset, client_partitions, install_partitions
from fedeq.devices.assign import assign_tiers
from fedeq.engines.ray.cluster import start_ray
from fedeq.engines.ray.cohorts import cohort_caps
from fedeq.engines.ray.grid import RayGrid
from fedeq.engines.ray.pools import cpus_needed, plan_grid
from fedeq.engines.ray.pools import plan_pools as plan_pools  # re-exported: per-tier pool sizes
from fedeq.server.app import run_server

RUN_ID = 1


@contextlib.contextmanager
def server_identity(run_id: int = RUN_ID) -> Iterator[None]:
    """The process identity Flower's ``Message`` constructor reads (set as a ServerApp process would)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run_id, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextlib.contextmanager
def caller_sigterm_handler() -> Iterator[None]:
    """Keep the caller's Python SIGTERM handler across ``ray.init`` (which replaces it with ``sys.exit``), so
    that SIGTERM stops a run the way its caller arranged (``fedeq simulate``: clean up, exit 143)."""
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if saved is not None:  # a Python handler, SIG_DFL or SIG_IGN
            signal.signal(signal.SIGTERM, saved)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def startup_line(quiet: bool) -> Callable[[str], None]:
    """A function printing one start-up line on standard error (one that prints nothing when ``quiet``)."""
    if quiet:
        return lambda text: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda text: console.print(text, style="dim", soft_wrap=True, highlight=False)


def make_grid(cfg: Any, plan: tuple[list[list[int]], list[int], int] | None = None) -> RayGrid:
    """Start (or join) Ray and build the grid of ``cfg``'s devices (``plan``: :func:`plan_grid` of ``cfg``,
    when the caller has it already)."""
    groups, sizes, cpus = plan or plan_grid(cfg)
    start_ray(cfg.ray.address, num_cpus=None if cfg.ray.address else cpus)
    have = float(ray.cluster_resources().get("CPU", 0.0))
    need = cpus_needed([cfg.devices.tiers[group[0]] for group in groups], sizes)
    if need > have + 1e-9:
        raise ValueError(
            f"ray: the tiers' actor pools {sizes} need {need:g} CPUs but the Ray cluster has {have:g}; "
            "allowed: a cluster with enough CPUs, a smaller ray.actors_per_tier or smaller tier num_cpus"
        )
    return RayGrid(
        cfg.devices.tiers,
        assign_tiers(cfg),
        run_config=to_run_config(cfg),
        call_timeout_s=cfg.ray.call_timeout_s,
        sizes=sizes,
        groups=groups,
        run_id=RUN_ID,
        cohort_size=cfg.ray.cohort_size,
    )


def client_data(cfg: Any) -> tuple[Any, tuple[Any, ...]]:
    """The dataset split and the client partitions of ``cfg`` (loaded and partitioned in this process)."""
    return client_dataset(cfg.data, cfg.seed), client_partitions(cfg.data, cfg.num_clients, cfg.seed)


def share_partitions(grid: RayGrid, cfg: Any, data: tuple[Any, tuple[Any, ...]] | None = None) -> None:
    """Load and partition the data once, here (or take ``data`` from :func:`client_data`), and install
    both in every actor of ``grid``.

    Without this every actor would repeat the partitioning on its first call, and load and split the
    dataset itself (importing scikit-learn, ~150 MB per actor); the driver needs both anyway
    (``run_server`` records the partition sizes and evaluates on the test split). The arrays go through
    Ray's object store once; the actors read them in place.
    """
    splits, parts = client_data(cfg) if data is None else data
    grid.set_actor_setup(install_partitions, (cfg.data, cfg.num_clients, cfg.seed, parts, splits))


def run_ray_simulation(cfg: Any, out: Path, quiet: bool = False, resume: bool = False) -> None:
    """Run ``cfg`` with fedeq's Ray engine; results go to ``out``.

    Start-up overlaps its three slow parts: a thread loads and partitions the data while Ray starts, and
    the actors import torch and the ClientApp while the driver finishes with the data. Unless ``quiet``,
    one line on standard error says what starts.
    """
    started_here = not ray.is_initialized()
    grid: RayGrid | None = None
    say = startup_line(quiet)
    try:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedeq-data")
        try:
            say(f"loading data: {cfg.data.name}, {cfg.num_clients} partitions")
            data = pool.submit(client_data, cfg)
            plan = plan_grid(cfg)
            _, sizes, cpus = plan
            where = f"Ray ({_count(cpus, 'CPU')})"
            if cfg.ray.address:
                where = f"the Ray cluster at {cfg.ray.address}"
            say(f"starting {where} and {_count(sum(sizes), 'worker')}")
            with caller_sigterm_handler():
                grid = make_grid(cfg, plan)
        finally:
            pool.shutdown(wait=False)
        grid.warm_up(wait=False)
        share_partitions(grid, cfg, data.result())
        if cfg.ray.cohort_size == "auto":
            sizes_of_tiers = [grid.pools[grid.pool_of[t]].size for t in range(len(cfg.devices.tiers))]
            grid.cohort_caps = cohort_caps(cfg, data.result()[0], sizes_of_tiers)
        grid.wait_ready()  # an actor that cannot start stops the run here, with its error
        with server_identity():
            run_server(grid, cfg, out_dir=out, quiet=quiet, resume=resume)
    finally:  # also on Ctrl-C / SIGTERM (raised as KeyboardInterrupt by the caller's handler)
        if grid is not None:
            grid.shutdown()
        if started_here:
            ray.shutdown()
