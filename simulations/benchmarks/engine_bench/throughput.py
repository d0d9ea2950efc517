"""``throughput``: client updates per second of the real ClientApp with clients sharing a device."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

from engine_bench.report import Report, median, table
from engine_bench.runner import run_child


def _throughput_config(spec: dict[str, Any]) -> Any:
    """One tier (all clients alike, every client online) sharing the device: the throughput workload."""
    from fedeq.config import load_config

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

    from fedeq.data import client_dataset
    from fedeq.models import build_model

    splits = client_dataset(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)


def _client_round_loop(grid: Any, cfg: Any) -> list[tuple[int, float]]:
    """Train rounds of the real ClientApp through ``grid``: (ok replies, wall seconds) per round."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedeq.config import RUN_CONFIG_KEY, to_yaml

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

    from clients.run_setup import train_options
    from fedeq.data import load_client_data
    from fedeq.devices.settings import tier_deq_settings
    from fedeq.train import evaluate, resolve_device, train_local

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
        values[engine] = median(runs)
        report.add(
            "throughput", engine, "client_updates_per_s", values[engine], "1/s", f"device={args.device}"
        )
        rows.append([engine, f"{values[engine]:.1f}", f"{min(runs):.1f}-{max(runs):.1f}"])
    for row in rows:
        row.append(f"{values[row[0]] / values['loop']:.2f}")
    table(
        f"Throughput, real ClientApp, device {args.device}, GPU share {args.gpu_share:g}, "
        f"{args.tp_clients} clients/round (rounds 2..{args.tp_rounds})",
        ["engine", "client updates/s", "range", "vs sequential loop"],
        rows,
    )
