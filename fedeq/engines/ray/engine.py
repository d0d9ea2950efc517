"""Run a fedeq config on the Ray device engine (:class:`fedeq.engines.ray.grid.RayGrid`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
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
from fedeq.engines.ray.grid import RayGrid
from fedeq.engines.ray.pools import pool_sizes
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


def _cpus_needed(cfg: Any, sizes: list[int]) -> float:
    """Logical CPUs the tiers' actor pools of ``sizes`` ask for together."""
    return sum(size * float(t.num_cpus) for size, t in zip(sizes, cfg.devices.tiers, strict=True))


def plan_pools(cfg: Any) -> tuple[list[int], int]:
    """Pool size of every tier and the logical CPUs a local cluster needs to hold them all (a whole
    number, as Ray requires, even when tiers ask for fractions of a CPU)."""
    cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1)
    sizes = pool_sizes(cfg.devices.tiers, cpus, cfg.ray.actors_per_tier)
    return sizes, math.ceil(max(cpus, _cpus_needed(cfg, sizes)) - 1e-9)


def make_grid(cfg: Any) -> RayGrid:
    """Start (or join) Ray and build the grid of ``cfg``'s devices."""
    sizes, cpus = plan_pools(cfg)
    start_ray(cfg.ray.address, num_cpus=None if cfg.ray.address else cpus)
    have = float(ray.cluster_resources().get("CPU", 0.0))
    need = _cpus_needed(cfg, sizes)
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
        run_id=RUN_ID,
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
    the actors import torch and the ClientApp while the driver finishes with the data.
    """
    started_here = not ray.is_initialized()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedeq-data")
    try:
        data = pool.submit(client_data, cfg)
        grid = make_grid(cfg)
    finally:
        pool.shutdown(wait=False)
    try:
        grid.warm_up(wait=False)
        share_partitions(grid, cfg, data.result())
        grid.wait_ready()
        with server_identity():
            run_server(grid, cfg, out_dir=out, quiet=quiet, resume=resume)
    finally:
        grid.shutdown()
        if started_here:
            ray.shutdown()
