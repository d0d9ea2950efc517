"""``overhead``: a trivial ClientApp on fedeq's engine and on Flower's, the same FedAvg round loop."""

from __future__ import annotations

import argparse
import time
from typing import Any

from engine_bench.apps import ECHO_APP
from engine_bench.report import TARGETS, Report, median, table
from engine_bench.runner import run_child


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

    from engine_bench.apps import echo_app

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
                    f"{median(steady) * 1e3:9.2f} ms over {len(steady)} rounds, "
                    f"startup {res['startup_s']:.1f} s",
                    flush=True,
                )

    def stat(engine: str, name: str) -> tuple[float, float, float]:
        per_run = []
        for res in results[(engine, name)]:
            steady = median(res["round_s"][1:])
            per_run.append(steady / plans[name]["clients"] if name == "per_call" else steady)
        return median(per_run), min(per_run), max(per_run)

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
        e: median([r["startup_s"] + r["round_s"][0] for n in plans for r in results[(e, n)]])
        for e in ("fedeq", "flower")
    }
    for engine, value in starts.items():
        report.add("overhead", engine, "startup", value, "s", "engine start to the end of round 1")
    rows.append(
        ["engine start to end of round 1, s", f"{starts['fedeq']:.1f}", f"{starts['flower']:.1f}", "", ""]
    )
    table(
        f"Engine overhead, trivial ClientApp, {args.actors} actors x 1 CPU, {args.floats} float32 echoed "
        f"(median of {args.repeat} runs; range)",
        ["", "fedeq RayGrid", "Flower run_simulation", "Flower/fedeq", "target (fedeq)"],
        rows,
    )
