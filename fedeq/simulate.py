"""Launch a simulation of a validated config on one of the engines."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedeq.results import run_dir


def quiet_flower_logs(level: int = logging.WARNING) -> None:
    """Flower logs every message at INFO; keep the console for fedeq's round lines."""
    logging.getLogger("flwr").setLevel(level)


def run_flower_simulation(cfg: Any, out: Path, quiet: bool = False) -> None:
    """Flower's own simulation runtime: every client gets the same Ray resources (the first tier's)."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from fedeq.server_app import make_server_app

    tier0 = cfg.devices.tiers[0]
    backend_config = {
        "client_resources": {"num_cpus": float(tier0.num_cpus), "num_gpus": float(tier0.num_gpus)},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    if not quiet:
        quiet_flower_logs()
    run_simulation(
        server_app=make_server_app(cfg, out_dir=out, quiet=quiet),
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,
    )


def simulate(cfg: Any, quiet: bool = False) -> Path:
    """Run ``cfg`` on its engine and return the output folder."""
    out = run_dir(cfg.output_dir, cfg.run_name)
    if cfg.engine == "flower":
        run_flower_simulation(cfg, out, quiet=quiet)
    else:
        raise ValueError(f"engine: unknown engine {cfg.engine!r}; allowed: flower")
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without results in {out}; see the log above")
    return out
