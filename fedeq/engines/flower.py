"""Flower's own simulation engine (``engine: flower``): every client gets the same Ray resources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedeq.engines.base import Engine
from fedeq.registry import ENGINES

__all__ = ["FlowerEngine", "run_flower_simulation"]


def run_flower_simulation(cfg: Any, out: Path, quiet: bool = False) -> None:
    """Flower's own simulation runtime: every client gets the same Ray resources (the first tier's)."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from fedeq.server.app import make_server_app

    tier0 = cfg.devices.tiers[0]
    backend_config = {
        "client_resources": {"num_cpus": float(tier0.num_cpus), "num_gpus": float(tier0.num_gpus)},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    run_simulation(
        server_app=make_server_app(cfg, out_dir=out, quiet=quiet),
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,
    )


@ENGINES.register("flower")
class FlowerEngine(Engine):
    """Flower's simulation runtime; it owns the round loop, so its runs cannot be resumed."""

    supports_resume = False
    no_resume_reason = "Flower's runtime owns the loop"

    def run(self, cfg: Any, out_dir: Path, quiet: bool = False, resume: bool = False) -> None:
        if resume:
            raise ValueError(f"engine=flower: {self.no_resume_reason}; it cannot resume a run")
        run_flower_simulation(cfg, out_dir, quiet=quiet)
