"""Where the first seconds of ``fedeq simulate`` go, and the time to its first round line.

Two measurements, each in fresh processes:

- ``split``: one child process runs the start-up steps of a run one after the other and times each alone:
  ``imports`` (the modules the driver imports before round 1), ``config + checks`` (``load_config`` and the
  checks before any work: data, model, strategy), ``data`` (the driver's dataset split and partitions),
  ``ray init`` (a local Ray without dashboard), ``actor start`` (the tiers' actor pools: each actor imports
  torch and the ClientApp, then receives the partitions) and ``round 1`` (``run_server`` for one round,
  including the server's own set-up and its central evaluation). The ``imports`` row is broken down by the
  packages that cost most (from ``python -X importtime``; inclusive times, so they overlap).
- ``end to end``: ``fedeq simulate [CONFIG] [key=value ...]`` as a user runs it (the embedded default without
  arguments), its console lines time-stamped as they arrive; reported: the time to each start-up line and
  to the first round line. A real run overlaps the steps, so the total is less than the split's sum.

The machine may be shared: every number is the median (and minimum) of ``--repeats`` runs, and the load
average is printed with the table. Each repeat writes to a temporary folder that is removed afterwards.

Examples::

    python simulations/benchmarks/startup.py                    # the embedded default, 3 repeats
    python simulations/benchmarks/startup.py --repeats 5 rounds=2
    python simulations/benchmarks/startup.py --no-split simulations/configs/quick.yaml
    python simulations/benchmarks/startup.py --no-split --versus ray.num_cpus=4 rounds=2  # vs one pool a tier
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DRIVER_MODULES = ("fedeq.cli.main", "fedeq.engines.simulate", "fedeq.engines.ray.engine", "sklearn.datasets")
"""What the ``fedeq simulate`` process imports before its first round."""
HEAVY_PACKAGES = ("torch", "flwr", "ray", "pandas", "sklearn", "pydantic", "omegaconf")
ROUND_LINE = re.compile(r"^round\s+1/")


def _phases(args: list[str]) -> dict[str, float]:
    """Run the start-up steps one by one in this (fresh) process; seconds per step."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    import importlib

    for module in DRIVER_MODULES:
        importlib.import_module(module)
    times["imports"] = time.perf_counter() - t

    from fedeq.cli.config_args import check_runnable, split_config_args
    from fedeq.config import load_config
    from fedeq.engines.ray import engine as ray_engine
    from fedeq.engines.simulate import quiet_flower_logs
    from fedeq.server.app import run_server

    quiet_flower_logs()
    t = time.perf_counter()
    path, overrides = split_config_args(args)
    cfg = load_config(path, overrides)
    check_runnable(cfg)
    times["config + checks"] = time.perf_counter() - t

    t = time.perf_counter()
    data = ray_engine.client_data(cfg)
    times["data"] = time.perf_counter() - t

    import ray

    t = time.perf_counter()
    _, _, cpus = ray_engine.plan_grid(cfg)
    ray_engine.start_ray(cfg.ray.address, num_cpus=None if cfg.ray.address else cpus)
    times["ray init"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        grid = ray_engine.make_grid(cfg)
        grid.warm_up(wait=False)
        ray_engine.share_partitions(grid, cfg, data)
        grid.wait_ready()
        times["actor start"] = time.perf_counter() - t
        try:
            one = cfg.model_copy(update={"rounds": 1})
            with tempfile.TemporaryDirectory() as tmp, ray_engine.server_identity():
                t = time.perf_counter()
                run_server(grid, one, out_dir=Path(tmp) / "run", quiet=True)
                times["round 1"] = time.perf_counter() - t
        finally:
            grid.shutdown()
    finally:
        ray.shutdown()
    return times


def _import_breakdown() -> dict[str, float]:
    """Inclusive import seconds of the heavy packages, from ``python -X importtime`` (a fresh process)."""
    code = "; ".join(f"import {m}" for m in DRIVER_MODULES)
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    ).stderr
    found: dict[str, float] = {}
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        if name in HEAVY_PACKAGES and name not in found:
            found[name] = int(parts[1]) / 1e6
    return found


def _end_to_end(args: list[str]) -> dict[str, float]:
    """Run ``fedeq simulate`` once; seconds from its start to each start-up line and to the round-1 line."""
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedeq.cli", "simulate", *args, f"output_dir={tmp}"]
        env = {**os.environ, "COLUMNS": "200"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            text = line.strip()
            if text.startswith(("loading", "building", "starting")):
                marks.setdefault(text.split(":")[0].split(" (")[0], now)
            if ROUND_LINE.match(text) and "first round line" not in marks:
                marks["first round line"] = now
                marks.update(_tree_cpu(proc.pid))
        proc.wait()
        marks["exit"] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"fedeq simulate exited with {proc.returncode}")
    return marks


def _tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) spent so far by process ``pid`` and its descendants, by kind: the driver,
    the Ray actors (and idle Ray workers), Ray's own processes. Unlike wall time, barely moved by a busy
    machine."""
    import psutil

    cpu = {"cpu s: driver": 0.0, "cpu s: actors and workers": 0.0, "cpu s: ray system": 0.0}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        kind = "driver" if proc.pid == pid else "actors and workers" if title.startswith("ray::") else ""
        if title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
            kind = ""
        cpu[f"cpu s: {kind or 'ray system'}"] += times.user + times.system
    cpu["cpu s: total"] = sum(cpu.values())
    return cpu


def _summarise(title: str, runs: list[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for run in runs for k in run))
    print(f"\n{title} ({len(runs)} runs)")
    print(f"  {'step':<34}{'median s':>10}{'min s':>10}")
    for key in keys:
        values = [run[key] for run in runs if key in run]
        print(f"  {key:<34}{statistics.median(values):>10.2f}{min(values):>10.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] as for fedeq simulate")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--no-split", action="store_true", help="only the end-to-end runs")
    parser.add_argument(
        "--versus",
        metavar="OVERRIDES",
        help="also time the end-to-end run with these extra key=value overrides, alternating with the first "
        "(e.g. 'ray.num_cpus=4': one actor pool per tier on 2 cores)",
    )
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)  # the split's child
    ns = parser.parse_args(argv)
    if ns.phases:
        print(json.dumps(_phases(ns.args)))
        return 0
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not ns.no_split:
        split: list[dict[str, float]] = []
        for _ in range(ns.repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--phases", *ns.args], capture_output=True, text=True, check=True
            ).stdout
            times = json.loads(out.strip().splitlines()[-1])
            times["sum"] = sum(times.values())
            imports = _import_breakdown()
            split.append({**times, **{f"  import {k} (inclusive)": v for k, v in imports.items()}})
        _summarise("split: each step alone, one after the other", split)
    variants = [ns.args, *([[*ns.args, *shlex.split(ns.versus)]] if ns.versus else [])]
    e2e: list[list[dict[str, float]]] = [[] for _ in variants]
    for _ in range(ns.repeats):  # alternate, so a drifting load hits both alike
        for runs, args in zip(e2e, variants, strict=True):
            runs.append(_end_to_end(args))
    for runs, args in zip(e2e, variants, strict=True):
        _summarise(f"end to end: fedeq simulate {' '.join(args)}".rstrip(), runs)
    print(f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
