"""Benchmark fedeq's Ray device engine (:class:`fedeq.engines.ray.grid.RayGrid`), side by side with Flower's.

Every measurement runs in a fresh child process (the two engines never share a Ray instance, and peak
memory belongs to one run); the parent prints the tables and writes ``--csv``. Sections:

``overhead``
    A trivial ClientApp (``tests.apps:echo_app``: echo the arrays, three metrics) driven by the same FedAvg
    round loop (``configure_train`` → ``send_and_receive`` → ``aggregate_train``) on (a) a ``RayGrid`` and
    (b) Flower's ``run_simulation`` with a ServerApp, both with the same number of 1-CPU actors. *Per call*:
    round wall / clients at ``--clients`` per round; *per round floor*: median round wall at 1 client.
    The first round (actor start) is left out; engines alternate over ``--repeat`` runs; medians.
``efficiency``
    The default workload (``fedeq simulate`` defaults: 4 tiers, digits, Dirichlet) at 100 clients per
    round on fedeq's engine through ``run_ray_simulation``. Per round: the grid's train
    ``send_and_receive`` wall, the ClientApp's busy time per actor (measured inside the actors) and
    ``compute_s`` / ``compute_cpu_s`` (wall and CPU time in ``train_local``, from ``clients.csv``).
    Efficiency = Σ compute_s / (wall × actors), and the machine's view Σ compute_cpu_s / (wall × cores);
    the bottleneck view compares the round's wall with the slowest pool's summed time.
``scale``
    A synthetic npz (60,000 images, 8×8 by default), ``num_clients`` registered (default 1k, 3k, 10k),
    100 per round, 3 rounds, small model: start time (process start → first round dispatched, with its
    phases) and peak RSS (VmHWM) of the driver, of the actors and of every process of the run's Ray cluster.
``throughput``
    Client updates per second of the real ClientApp (``clients.client_app:app``) with clients sharing a
    device: fedeq's engine (a tier with ``num_gpus = --gpu-share``), Flower's engine (``client_resources``
    with the same share) and a framework-free sequential loop (``train_local`` + validation per client).
    Meant for a GPU machine (``--device cuda --gpu-share 0.25``); ``--device cpu`` runs the same code here.

Examples::

    python simulations/benchmarks/engine.py                              # overhead, efficiency, scale
    python simulations/benchmarks/engine.py overhead --repeat 5 --csv engine.csv
    python simulations/benchmarks/engine.py scale --scale-clients 10000
    python simulations/benchmarks/engine.py throughput --device cuda --gpu-share 0.25 --tp-clients 64
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "@@engine-benchmark-result "
ECHO_APP = "tests.apps:echo_app"
SECTIONS = ("overhead", "efficiency", "scale", "throughput")
TARGETS = {
    "per_call_ms": 2.0,
    "round_floor_ms": 50.0,
    "efficiency": 0.90,
    "peak_rss_gb": 3.0,
    "start_s": 15.0,
}


# ------------------------------------------------------------------------------------------------ helpers


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process, from /proc."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _tree_memory(root: int) -> dict[str, float]:
    """Peak (VmHWM) and current RSS of ``root``'s descendants: the processes of its local Ray cluster."""
    peaks, current = [], []
    for pid in _descendants(root):
        st = _proc_status(pid)
        peaks.append(st.get("VmHWM", 0))
        current.append(st.get("VmRSS", 0))
    return {"procs": len(peaks), "peak_sum_bytes": float(sum(peaks)), "rss_sum_bytes": float(sum(current))}


def _tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each live descendant of ``root``, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def _pss(pid: int) -> int:
    """Proportional set size (bytes): shared pages split among the processes that map them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PssSampler:
    """Samples the summed PSS of this process and all its descendants every ``interval`` seconds (a
    thread); ``peak`` is the largest total seen: the run's memory, shared libraries counted once."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self.peak = 0
        self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            driver = _pss(me)
            total = driver + sum(_pss(pid) for pid in _descendants(me))
            self.peak, self.peak_driver = max(self.peak, total), max(self.peak_driver, driver)
            self._stop.wait(self.interval)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _self_peak_rss() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def _quiet_logs() -> None:
    import logging

    for name in ("flwr", "ray", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _machine_line() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


# ------------------------------------------------------------------------------------------------ round loop


def fedavg_rounds(grid: Any, clients: int, rounds: int, floats: int) -> list[float]:
    """The round loop both engines run: FedAvg's train steps only; wall seconds of every round."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    arrays = ArrayRecord([np.zeros(floats, dtype=np.float32)])
    strategy = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
    )
    times = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        times.append(time.perf_counter() - t0)
        if len(replies) != clients or new_arrays is None:
            raise RuntimeError(f"round {rnd}: {len(replies)} replies of {clients}")
        arrays = new_arrays
    return times


# ------------------------------------------------------------------------------------------------ children


def child_overhead_fedeq(spec: dict[str, Any]) -> dict[str, Any]:
    from types import SimpleNamespace

    import ray

    from fedeq.engines.ray.engine import server_identity
    from fedeq.engines.ray.grid import RayGrid, start_ray

    t0 = time.perf_counter()
    start_ray(num_cpus=spec["actors"])
    tier = SimpleNamespace(name="echo", share=1.0, num_cpus=1.0, num_gpus=0.0)
    options = {} if spec.get("pipeline") is None else {"pipeline": spec["pipeline"]}
    grid = RayGrid([tier], [0] * spec["clients"], app_ref=ECHO_APP, sizes=[spec["actors"]], **options)
    grid.warm_up()
    startup = time.perf_counter() - t0
    try:
        with server_identity():
            times = fedavg_rounds(grid, spec["clients"], spec["rounds"], spec["floats"])
    finally:
        grid.shutdown()
        ray.shutdown()
    return {"round_s": times, "startup_s": startup}


def child_overhead_flower(spec: dict[str, Any]) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from tests.apps import echo_app

    out: dict[str, Any] = {}
    server = ServerApp()
    t0 = time.perf_counter()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        out["startup_s"] = time.perf_counter() - t0
        out["round_s"] = fedavg_rounds(grid, spec["clients"], spec["rounds"], spec["floats"])

    run_simulation(
        server_app=server,
        client_app=echo_app,
        num_supernodes=spec["clients"],
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {"num_cpus": spec["actors"], "include_dashboard": False, "log_to_driver": False},
        },
    )
    if "round_s" not in out:
        raise RuntimeError("Flower's simulation ended without running the rounds")
    return out


class _Probe:
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
            {"t": time.perf_counter(), "driver_cpu": time.process_time(), "tree_cpu": _tree_cpu(os.getpid())}
        )

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.time())
        self.cpu_marks.setdefault(name, time.process_time())

    def install(self) -> None:
        import fedeq.engines.ray.engine as engine
        import fedeq.server.app as server

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
            self.tree = _tree_memory(os.getpid())
            shutdown()

        grid.send_and_receive, grid.wait_ready, grid.shutdown = send_probe, wait_ready_probe, shutdown_probe


def _run_probed(cfg: Any, out: Path, spec: dict[str, Any]) -> _Probe:
    from fedeq.engines.ray.engine import run_ray_simulation

    probe = _Probe(spec.get("pipeline"), spec.get("share_partitions", True))
    probe.install()
    run_ray_simulation(cfg, out, quiet=True)
    return probe


def child_efficiency(spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from fedeq.config.core import load_config

    out = Path(spec["out"])
    cfg = load_config(
        None,
        [
            f"num_clients={spec['clients']}",
            f"clients_per_round={spec['clients']}",
            f"rounds={spec['rounds']}",
            "engine=ray",
            f"output_dir={out.parent}",
            *spec["overrides"],
        ],
    )
    probe = _run_probed(cfg, out, spec)
    clients = pd.read_csv(out / "clients.csv")
    rounds = pd.read_csv(out / "rounds.csv")
    tiers = [t.name for t in cfg.devices.tiers]
    per_round = []
    prev: dict[tuple[int, str], float] = {}
    for i, r in enumerate(probe.rounds, start=1):
        busy = {t: 0.0 for t in tiers}
        cpu = {t: 0.0 for t in tiers}
        for st in r["actors"]:
            for key, acc in (("busy_s", busy), ("cpu_s", cpu)):
                acc[st["tier"]] += st[key] - prev.get((st["pid"], key), 0.0)
                prev[(st["pid"], key)] = st[key]
        rows = clients[clients["round"] == i]
        compute = {t: float(rows[rows.tier == t].compute_s.fillna(0).sum()) for t in tiers}
        compute_cpu = {t: float(rows[rows.tier == t].compute_cpu_s.fillna(0).sum()) for t in tiers}
        per_round.append(
            {
                "round": i,
                "grid_wall_s": r["wall_s"],
                "round_wall_s": float(rounds.loc[rounds["round"] == i, "wall_s"].iloc[0]),
                "busy_s": busy,
                "cpu_s": cpu,
                "compute_s": compute,
                "compute_cpu_s": compute_cpu,
                "ok": int((rows.status == "ok").sum()),
                "calls": r["messages"],
            }
        )
    sizes = {t: sum(1 for st in probe.final_stats if st["tier"] == t) for t in tiers}
    actor_pids = sorted({st["pid"] for r in probe.rounds for st in r["actors"]})
    snaps = [
        {**sn, "tree_cpu": {str(pid): cpu for pid, cpu in sn["tree_cpu"].items()}} for sn in probe.snaps
    ]
    return {
        "rounds": per_round,
        "pool_sizes": sizes,
        "marks": probe.marks,
        "cores": os.cpu_count(),
        "snaps": snaps,
        "actor_pids": actor_pids,
    }


def make_npz(path: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` synthetic ``size``×``size`` uint8 images of 10 classes (a per-class pattern plus noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (10, size, size))
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = np.clip(templates[y] + rng.normal(0, 40, (n, size, size)), 0, 255).astype(np.uint8)
    np.savez(path, x=x, y=y.astype(np.int64))


def child_scale(spec: dict[str, Any]) -> dict[str, Any]:
    t_main = time.time()
    import ray  # noqa: F401
    import torch  # noqa: F401

    from fedeq.config.core import load_config
    from fedeq.engines.ray.engine import run_ray_simulation  # noqa: F401

    t_imports = time.time()
    out = Path(spec["out"])
    cfg = load_config(
        None,
        [
            "data.name=npz",
            f"data.path={spec['npz']}",
            f"num_clients={spec['clients']}",
            f"clients_per_round={spec['per_round']}",
            f"rounds={spec['rounds']}",
            "engine=ray",
            f"output_dir={out.parent}",
            *spec["overrides"],
        ],
    )
    with PssSampler() as pss:
        probe = _run_probed(cfg, out, spec)
    probe.marks.update(child_main=t_main, imports_done=t_imports)
    actors = probe.final_stats
    return {
        "marks": probe.marks,
        "cpu_marks": probe.cpu_marks,
        "eval0_s": probe.eval_before_dispatch_s,
        "peak_pss_bytes": pss.peak,
        "driver_peak_pss_bytes": pss.peak_driver,
        "driver_peak_bytes": _self_peak_rss(),
        "actor_peaks_bytes": [st["peak_rss_bytes"] or 0 for st in actors],
        "actor_first_call_s": [st["first_call_s"] for st in actors],
        "tree": probe.tree,
        "round_walls_s": [r["wall_s"] for r in probe.rounds],
    }


def _throughput_config(spec: dict[str, Any]) -> Any:
    """One tier (all clients alike, every client online) sharing the device: the throughput workload."""
    from fedeq.config.core import load_config

    tier = {
        "name": "shared",
        "share": 1.0,
        "solver": "anderson",
        "f_max_iter": spec["f_max_iter"],
        "b_max_iter": spec["b_max_iter"],
        "backward": "ift",
        "num_cpus": spec["cpus_per_client"],
        "num_gpus": spec["gpu_share"],
    }
    return load_config(
        None,
        [
            f"num_clients={spec['clients']}",
            f"clients_per_round={spec['clients']}",
            f"rounds={spec['rounds']}",
            f"train.device={spec['device']}",
            f"devices.tiers=[{json.dumps(tier)}]",
            f"output_dir={tempfile.gettempdir()}",
            *spec["overrides"],
        ],
    )


def _initial_model(cfg: Any) -> Any:
    """The configured model with the initial weights of ``cfg.seed`` (the same for every engine)."""
    import torch

    from fedeq.data.core import load_dataset
    from fedeq.models.core import build_model

    splits = load_dataset(cfg.data.name, cfg.data.path, cfg.data.test_path, cfg.data.test_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)


def _client_round_loop(grid: Any, cfg: Any) -> list[tuple[int, float]]:
    """Train rounds of the real ClientApp through ``grid``: (ok replies, wall seconds) per round."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedeq.config.core import RUN_CONFIG_KEY, to_yaml

    arrays = ArrayRecord(_initial_model(cfg).state_dict())
    n = cfg.num_clients
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    config = ConfigRecord({RUN_CONFIG_KEY: to_yaml(cfg)})
    out = []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, config, grid))
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        out.append((sum(1 for r in replies if r.has_content()), time.perf_counter() - t0))
        if new_arrays is not None:
            arrays = new_arrays
    return out


def child_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = _throughput_config(spec)
    engine = spec["engine"]
    if engine == "fedeq":
        import ray

        from fedeq.engines.ray.engine import make_grid, server_identity, share_partitions

        grid = make_grid(cfg)
        try:
            grid.warm_up(wait=False)
            share_partitions(grid, cfg)
            grid.wait_ready()
            with server_identity():
                rounds = _client_round_loop(grid, cfg)
            actors = len(grid.actor_stats())
        finally:
            grid.shutdown()
            ray.shutdown()
        return {"rounds": rounds, "actors": actors}
    if engine == "flower":
        from flwr.app import Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        from clients.client_app import app as client_app

        res: dict[str, Any] = {}
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            res["rounds"] = _client_round_loop(grid, cfg)

        tier = cfg.devices.tiers[0]
        run_simulation(
            server_app=server,
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config={
                "client_resources": {"num_cpus": float(tier.num_cpus), "num_gpus": float(tier.num_gpus)},
                "init_args": {"include_dashboard": False, "log_to_driver": False},
            },
        )
        if "rounds" not in res:
            raise RuntimeError("Flower's simulation ended without running the rounds")
        return res
    return {"rounds": _sequential_loop(cfg), "actors": 1}


def _sequential_loop(cfg: Any) -> list[tuple[int, float]]:
    """The same client work without any framework: for each client, load its data, train, validate."""
    import numpy as np
    import torch

    from clients.client_app import tier_deq_settings, train_options
    from fedeq.data.core import load_client_data
    from fedeq.train.local import evaluate, resolve_device, train_local

    model = _initial_model(cfg)
    device = resolve_device(cfg.train.device)
    tier = cfg.devices.tiers[0]
    deq = tier_deq_settings(cfg, tier)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        total: dict[str, Any] = {}
        weight = 0
        for pid in range(cfg.num_clients):
            data = load_client_data(cfg.data, pid, cfg.num_clients, cfg.seed)
            model.load_state_dict(global_state)
            stats = train_local(
                model,
                data.x_train,
                data.y_train,
                **train_options(cfg),
                deq=deq,
                seed=rnd * 100_003 + pid,
                device=device,
            )
            evaluate(model, data.x_val, data.y_val, device=device, **deq)
            model.to("cpu")
            for k, v in model.state_dict().items():
                total[k] = total.get(k, 0) + v.detach().numpy().astype(np.float64) * stats.num_examples
            weight += stats.num_examples
        global_state = {
            k: torch.from_numpy((v / max(weight, 1)).astype(np.float32)) for k, v in total.items()
        }
        out.append((cfg.num_clients, time.perf_counter() - t0))
    return out


CHILDREN = {
    "overhead-fedeq": child_overhead_fedeq,
    "overhead-flower": child_overhead_flower,
    "efficiency": child_efficiency,
    "scale": child_scale,
    "throughput": child_throughput,
}


def run_child(kind: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one measurement in a fresh process (its own session, so leftovers can be stopped by group)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    spec = {**spec, "spawned_at": time.time()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{kind}: no result within {timeout_s:g} s") from None
    finally:
        try:  # whatever the run left behind in its session (Ray's own processes, if any)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            result["spawned_at"] = spec["spawned_at"]
            return result
    raise RuntimeError(f"{kind} failed (exit {proc.returncode}):\n{stderr[-4000:]}")


def child_main(kind: str, spec_text: str) -> None:
    _quiet_logs()
    result = CHILDREN[kind](json.loads(spec_text))
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ sections


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, engine: str, metric: str, value: float, unit: str, detail: str = "") -> None:
        self.rows.append(
            {
                "section": section,
                "engine": engine,
                "metric": metric,
                "value": value,
                "unit": unit,
                "detail": detail,
            }
        )

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["section", "engine", "metric", "value", "unit", "detail"])
            writer.writeheader()
            writer.writerows(self.rows)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def section_overhead(args: argparse.Namespace, report: Report) -> None:
    plans = {
        "per_call": {"clients": args.clients, "rounds": args.call_rounds},
        "floor": {"clients": 1, "rounds": args.floor_rounds},
    }
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for engine in ("fedeq", "flower"):
            for name, plan in plans.items():
                spec = {**plan, "actors": args.actors, "floats": args.floats, "pipeline": args.pipeline}
                res = run_child(f"overhead-{engine}", spec, args.child_timeout)
                results.setdefault((engine, name), []).append(res)
                steady = res["round_s"][1:]
                print(
                    f"  overhead run {rep + 1}/{args.repeat} {engine:6s} {name:8s}: median round "
                    f"{_median(steady) * 1e3:9.2f} ms over {len(steady)} rounds, "
                    f"startup {res['startup_s']:.1f} s",
                    flush=True,
                )

    def stat(engine: str, name: str) -> tuple[float, float, float]:
        per_run = []
        for res in results[(engine, name)]:
            steady = _median(res["round_s"][1:])
            per_run.append(steady / plans[name]["clients"] if name == "per_call" else steady)
        return _median(per_run), min(per_run), max(per_run)

    rows = []
    for name, label, target in (
        ("per_call", f"per client call, ms ({args.clients} clients/round)", TARGETS["per_call_ms"]),
        ("floor", "per round floor, ms (1 client/round)", TARGETS["round_floor_ms"]),
    ):
        f_med, f_lo, f_hi = stat("fedeq", name)
        w_med, w_lo, w_hi = stat("flower", name)
        for engine, (med, lo, hi) in (("fedeq", (f_med, f_lo, f_hi)), ("flower", (w_med, w_lo, w_hi))):
            report.add("overhead", engine, name, med * 1e3, "ms", f"min {lo * 1e3:.3f} max {hi * 1e3:.3f}")
        report.add("overhead", "ratio", name, w_med / f_med, "flower/fedeq")
        rows.append(
            [
                label,
                f"{f_med * 1e3:.2f} ({f_lo * 1e3:.2f}-{f_hi * 1e3:.2f})",
                f"{w_med * 1e3:.1f} ({w_lo * 1e3:.1f}-{w_hi * 1e3:.1f})",
                f"{w_med / f_med:.0f}x",
                f"<= {target:g}",
            ]
        )
    starts = {
        e: _median([r["startup_s"] + r["round_s"][0] for n in plans for r in results[(e, n)]])
        for e in ("fedeq", "flower")
    }
    for engine, value in starts.items():
        report.add("overhead", engine, "startup", value, "s", "engine start to the end of round 1")
    rows.append(
        ["engine start to end of round 1, s", f"{starts['fedeq']:.1f}", f"{starts['flower']:.1f}", "", ""]
    )
    _table(
        f"Engine overhead, trivial ClientApp, {args.actors} actors x 1 CPU, {args.floats} float32 echoed "
        f"(median of {args.repeat} runs; range)",
        ["", "fedeq RayGrid", "Flower run_simulation", "Flower/fedeq", "target (fedeq)"],
        rows,
    )


def _cpu_budget(res: dict[str, Any], report: Report) -> None:
    """Where the machine's CPU went from the start of round 2 to the end: wall × cores split into local
    training, the rest of the ClientApp, the actors outside the ClientApp (Ray's worker, message
    (de)serialisation), the driver (ServerApp, strategy, engine), Ray's own processes, and idle."""
    snaps = res["snaps"]
    if len(snaps) < 3:
        return
    first, last = snaps[1], snaps[-1]
    steady = res["rounds"][1:]
    actor_pids = {str(pid) for pid in res["actor_pids"]}

    def delta(group: set[str] | None) -> float:
        pids = set(last["tree_cpu"]) | set(first["tree_cpu"])
        chosen = [p for p in pids if (p in group if group is not None else p not in actor_pids)]
        return sum(last["tree_cpu"].get(p, 0.0) - first["tree_cpu"].get(p, 0.0) for p in chosen)

    capacity = (last["t"] - first["t"]) * res["cores"]
    training = sum(sum(r["compute_cpu_s"].values()) for r in steady)
    app = sum(sum(r["cpu_s"].values()) for r in steady)
    actors = delta(actor_pids)
    parts = {
        "local training (train_local)": training,
        "ClientApp outside training": app - training,
        "actors outside the ClientApp": actors - app,
        "driver (ServerApp, strategy, engine)": last["driver_cpu"] - first["driver_cpu"],
        "Ray's own processes": delta(None),
    }
    parts["idle"] = capacity - sum(parts.values())
    rows = [[name, f"{value:.1f}", f"{value / capacity:.0%}"] for name, value in parts.items()]
    for name, value in parts.items():
        report.add("efficiency", "fedeq", f"cpu_share:{name}", value / capacity, "ratio")
    _table(
        f"CPU budget, rounds 2-{len(res['rounds'])}: {capacity:.1f} CPU-s = wall × {res['cores']} cores",
        ["where", "CPU s", "share"],
        rows,
    )


def section_efficiency(args: argparse.Namespace, report: Report, tmp: Path) -> None:
    res = run_child(
        "efficiency",
        {
            "clients": 100,
            "rounds": args.eff_rounds,
            "out": str(tmp / "efficiency"),
            "overrides": list(args.eff_overrides),
            "pipeline": args.pipeline,
            "share_partitions": not args.no_share_partitions,
        },
        args.child_timeout,
    )
    sizes = res["pool_sizes"]
    actors = sum(sizes.values())
    rows = []

    def summarise(rounds: list[dict[str, Any]], label: str) -> None:
        grid = sum(r["grid_wall_s"] for r in rounds)
        wall = sum(r["round_wall_s"] for r in rounds)
        compute = sum(sum(r["compute_s"].values()) for r in rounds)
        busy = sum(sum(r["busy_s"].values()) for r in rounds)
        cpu = sum(sum(r["cpu_s"].values()) for r in rounds)
        train_cpu = sum(sum(r["compute_cpu_s"].values()) for r in rounds)
        cores = res["cores"]
        slow_busy = sum(max(r["busy_s"][t] / sizes[t] for t in sizes) for r in rounds)
        slow_compute = sum(max(r["compute_s"][t] / sizes[t] for t in sizes) for r in rounds)
        values = {
            "compute_over_grid": compute / (grid * actors),
            "compute_over_round": compute / (wall * actors),
            "busy_over_grid": busy / (grid * actors),
            "slowest_pool_busy_over_grid": slow_busy / grid,
            "slowest_pool_compute_over_grid": slow_compute / grid,
            "actor_cpu_over_grid_cores": cpu / (grid * cores),
            "train_cpu_over_grid_cores": train_cpu / (grid * cores),
            "train_cpu_over_round_cores": train_cpu / (wall * cores),
        }
        for metric, value in values.items():
            report.add("efficiency", "fedeq", metric, value, "ratio", label)
        report.add("efficiency", "fedeq", "grid_wall_per_round", grid / len(rounds), "s", label)
        rows.append(
            [
                label,
                f"{grid / len(rounds):.2f} / {wall / len(rounds):.2f}",
                f"{compute:.1f} / {busy:.1f}",
                f"{values['compute_over_grid']:.0%} / {values['compute_over_round']:.0%}",
                f"{values['busy_over_grid']:.0%}",
                f"{values['slowest_pool_busy_over_grid']:.0%}",
                f"{values['slowest_pool_compute_over_grid']:.0%}",
                f"{values['actor_cpu_over_grid_cores']:.0%}",
                f"{values['train_cpu_over_grid_cores']:.0%} / {values['train_cpu_over_round_cores']:.0%}",
            ]
        )

    summarise(res["rounds"][1:], f"rounds 2-{len(res['rounds'])}")
    summarise(res["rounds"], f"all {len(res['rounds'])} rounds")
    _table(
        f"Efficiency, default workload at 100 clients/round, {actors} actors "
        f"({', '.join(f'{t} {n}' for t, n in sizes.items())}); {args.eff_rounds} rounds",
        [
            "",
            "wall/round s: grid / whole",
            "Σ compute / Σ app busy, s",
            "compute/(wall·actors): grid / whole",
            "app busy/(grid·actors)",
            "slowest pool busy/grid",
            "slowest pool compute/grid",
            f"actor CPU/(grid·{res['cores']} cores)",
            f"training CPU/(wall·{res['cores']} cores): grid / whole",
        ],
        rows,
    )
    _cpu_budget(res, report)
    per_tier = []
    steady = res["rounds"][1:]
    grid = sum(r["grid_wall_s"] for r in steady)
    for t in sizes:
        comp = sum(r["compute_s"][t] for r in steady)
        comp_cpu = sum(r["compute_cpu_s"][t] for r in steady)
        busy = sum(r["busy_s"][t] for r in steady)
        app_cpu = sum(r["cpu_s"][t] for r in steady)
        per_tier.append(
            [
                t,
                str(sizes[t]),
                f"{comp:.1f} / {comp_cpu:.1f}",
                f"{busy:.1f} / {app_cpu:.1f}",
                f"{busy / (grid * sizes[t]):.0%}",
                f"{app_cpu / (grid * sizes[t]):.0%}",
            ]
        )
        report.add("efficiency", "fedeq", f"pool_busy_fraction:{t}", busy / (grid * sizes[t]), "ratio")
    _table(
        "Per pool, rounds 2.. (busy = time inside the ClientApp, measured in the actor)",
        [
            "tier",
            "actors",
            "Σ compute s: wall / CPU",
            "Σ busy s: wall / CPU",
            "busy/(grid·actors)",
            "CPU/(grid·actors)",
        ],
        per_tier,
    )


def section_scale(args: argparse.Namespace, report: Report, tmp: Path) -> None:
    npz = tmp / f"synthetic-{args.images}x{args.image_size}.npz"
    if not npz.exists():
        make_npz(npz, args.images, args.image_size)
    rows, mem_rows = [], []
    gib, mib = 2.0**30, 2.0**20
    for n in args.scale_clients:
        spec = {
            "npz": str(npz),
            "clients": n,
            "per_round": min(100, n),
            "rounds": 3,
            "out": str(tmp / f"scale-{n}"),
            "overrides": list(args.scale_overrides),
            "pipeline": args.pipeline,
            "share_partitions": not args.no_share_partitions,
        }
        res = run_child("scale", spec, args.child_timeout)
        m, t0 = res["marks"], res["spawned_at"]
        start = m["first_dispatch"] - t0
        server_setup = m["first_dispatch"] - m["actors_ready"]
        phases = {
            "imports": m["imports_done"] - t0,
            "ray+grid": m["grid_built"] - m["make_grid_start"],
            "data (left after Ray start)": m["partitions_shared"] - m["partition_start"],
            "actors ready": m["actors_ready"] - m["partitions_shared"],
            "server setup": server_setup - res["eval0_s"],
            "central eval 0": res["eval0_s"],
        }
        driver_cpu = res["cpu_marks"]["first_dispatch"]
        actor_peaks = res["actor_peaks_bytes"]
        hwm_total = res["driver_peak_bytes"] + res["tree"]["peak_sum_bytes"]
        detail = f"num_clients={n}"
        for metric, value, unit in (
            ("start_s", start, "s"),
            ("driver_cpu_before_dispatch_s", driver_cpu, "s"),
            ("round1_s", res["round_walls_s"][0], "s"),
            ("round_later_s", _median(res["round_walls_s"][1:]), "s"),
            ("driver_peak_rss", res["driver_peak_bytes"] / gib, "GiB"),
            ("actor_peak_rss_max", max(actor_peaks) / gib, "GiB"),
            ("actors_peak_rss_sum", sum(actor_peaks) / gib, "GiB"),
            ("all_processes_peak_rss_sum", hwm_total / gib, "GiB"),
            ("peak_pss_total", res["peak_pss_bytes"] / gib, "GiB"),
        ):
            report.add("scale", "fedeq", metric, value, unit, detail)
        for name, value in phases.items():
            report.add("scale", "fedeq", f"start_phase:{name}", value, "s", detail)
        rows.append(
            [
                f"{n:,}",
                f"{start:.1f}",
                " + ".join(f"{v:.1f}" for v in phases.values()),
                f"{driver_cpu:.1f}",
                f"{res['round_walls_s'][0]:.1f} / {_median(res['round_walls_s'][1:]):.2f}",
            ]
        )
        mem_rows.append(
            [
                f"{n:,}",
                f"{res['driver_peak_bytes'] / mib:.0f}",
                f"{len(actor_peaks)} x {_median(actor_peaks) / mib:.0f}",
                f"{res['tree']['procs']}",
                f"{hwm_total / gib:.2f}",
                f"{res['peak_pss_bytes'] / gib:.2f}",
            ]
        )
    title = (
        f"Scale: synthetic npz {args.images:,} x {args.image_size}x{args.image_size}, "
        f"100 clients/round, 3 rounds, {' '.join(args.scale_overrides)}"
    )
    _table(
        f"{title}: start (target <= {TARGETS['start_s']:g} s at 10k)",
        [
            "registered clients",
            "start s",
            "= " + " + ".join(["imports", "ray+grid", "data left", "actors ready", "server", "eval 0"]),
            "driver CPU s",
            "round 1 / later s",
        ],
        rows,
    )
    _table(
        f"{title}: memory (target <= {TARGETS['peak_rss_gb']:g} GB at 10k)",
        [
            "registered clients",
            "driver peak RSS MiB",
            "actors peak RSS MiB",
            "Ray processes",
            "Σ peak RSS, all GiB",
            "peak Σ PSS GiB",
        ],
        mem_rows,
    )


def section_throughput(args: argparse.Namespace, report: Report) -> None:
    base = {
        "device": args.device,
        "gpu_share": args.gpu_share,
        "cpus_per_client": args.cpus_per_client,
        "clients": args.tp_clients,
        "rounds": args.tp_rounds,
        "f_max_iter": 12,
        "b_max_iter": 8,
        "overrides": list(args.tp_overrides),
    }
    rows = []
    values = {}
    for engine in ("fedeq", "flower", "loop"):
        runs = []
        for _ in range(args.repeat):
            res = run_child("throughput", {**base, "engine": engine}, args.child_timeout)
            steady = res["rounds"][1:]
            runs.append(sum(n for n, _ in steady) / sum(t for _, t in steady))
        values[engine] = _median(runs)
        report.add(
            "throughput", engine, "client_updates_per_s", values[engine], "1/s", f"device={args.device}"
        )
        rows.append([engine, f"{values[engine]:.1f}", f"{min(runs):.1f}-{max(runs):.1f}"])
    for row in rows:
        row.append(f"{values[row[0]] / values['loop']:.2f}")
    _table(
        f"Throughput, real ClientApp, device {args.device}, GPU share {args.gpu_share:g}, "
        f"{args.tp_clients} clients/round (rounds 2..{args.tp_rounds})",
        ["engine", "client updates/s", "range", "vs sequential loop"],
        rows,
    )


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"any of {', '.join(SECTIONS)} (default: all but throughput)",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds, repeats and scale points")
    p.add_argument("--repeat", type=int, default=3, help="runs per engine (medians)")
    p.add_argument("--csv", type=Path, help="write every number here (long format)")
    p.add_argument("--child-timeout", type=float, default=900.0, help="seconds per measurement process")
    p.add_argument(
        "--pipeline",
        type=int,
        help="calls in flight per busy actor of fedeq's engine (default: the engine's)",
    )
    p.add_argument(
        "--no-share-partitions",
        action="store_true",
        help="let every actor partition the data itself (as before the driver shared its partitions)",
    )
    g = p.add_argument_group("overhead")
    g.add_argument("--actors", type=int, default=2, help="1-CPU actors of both engines")
    g.add_argument("--clients", type=int, default=100, help="clients per round for the per-call cost")
    g.add_argument("--call-rounds", type=int, default=11, help="rounds at --clients (the first is left out)")
    g.add_argument("--floor-rounds", type=int, default=41, help="rounds at 1 client (the first is left out)")
    g.add_argument("--floats", type=int, default=10_000, help="float32 values echoed per call")
    g = p.add_argument_group("efficiency")
    g.add_argument("--eff-rounds", type=int, default=25)
    g.add_argument("--eff-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    g = p.add_argument_group("scale")
    g.add_argument("--scale-clients", type=int, nargs="+", default=[1000, 3000, 10000])
    g.add_argument("--images", type=int, default=60_000)
    g.add_argument("--image-size", type=int, default=8)
    g.add_argument(
        "--scale-overrides",
        nargs="*",
        default=["model.hidden=32", "eval.budgets=[1,4]"],
        metavar="KEY=VALUE",
        help="small model and a short final evaluation by default",
    )
    g = p.add_argument_group("throughput (GPU)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--gpu-share", type=float, default=0.0, help="GPU fraction per client (0.25: 4 share one)")
    g.add_argument("--cpus-per-client", type=float, default=1.0)
    g.add_argument("--tp-clients", type=int, default=16)
    g.add_argument("--tp-rounds", type=int, default=4)
    g.add_argument("--tp-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if not args.sections:
        args.sections = list(SECTIONS[:3])
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    if args.quick:
        args.repeat = 1
        args.call_rounds, args.floor_rounds = 3, 6
        args.eff_rounds = min(args.eff_rounds, 4)
        args.scale_clients = args.scale_clients[:1]
        args.tp_rounds = min(args.tp_rounds, 3)
    if args.device == "cpu" and args.gpu_share:
        p.error("--gpu-share needs --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[4])
        return 0
    args = parse_args(argv)
    report = Report()
    print(f"machine: {_machine_line()}, python {sys.version.split()[0]}", flush=True)
    print(
        f"fedeq engine: pipeline={args.pipeline or 'default'}, "
        f"partitions {'computed by every actor' if args.no_share_partitions else 'shared by the driver'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fedeq-engine-") as tmpdir:
        tmp = Path(tmpdir)
        for section in args.sections:
            t0 = time.perf_counter()
            if section == "overhead":
                section_overhead(args, report)
            elif section == "efficiency":
                section_efficiency(args, report, tmp)
            elif section == "scale":
                section_scale(args, report, tmp)
            else:
                section_throughput(args, report)
            print(f"  ({section}: {time.perf_counter() - t0:.0f} s; {_machine_line()})", flush=True)
    if args.csv:
        report.write_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
