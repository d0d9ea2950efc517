"""Launch a simulation of a validated config on one of the engines."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedeq.results.recorder import run_dir


def quiet_flower_logs(level: int = logging.WARNING) -> None:
    """Flower logs every message at INFO; keep the console for fedeq's round lines."""
    import flwr.common  # noqa: F401 - Flower sets its logger to DEBUG on first import: import it first
    logging.getLogger("flwr").setLevel(level)


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


def simulate(cfg: Any, quiet: bool = False, resume_dir: Path | None = None) -> Path:
    """Run ``cfg`` on its engine and return the output folder (``resume_dir`` continues a run there)."""
    out = Path(resume_dir) if resume_dir is not None else run_dir(cfg.output_dir, cfg.run_name)
    quiet_flower_logs(logging.ERROR if quiet else logging.WARNING)
    if cfg.engine == "ray":
        from fedeq.engines.ray.engine import run_ray_simulation

        run_ray_simulation(cfg, out, quiet=quiet, resume=resume_dir is not None)
    elif resume_dir is not None:
        raise ValueError(
            "--resume: runs on engine=flower cannot be resumed (Flower's runtime owns the loop); "
            "allowed: engine=ray"
        )
    else:
        run_flower_simulation(cfg, out, quiet=quiet)
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without results in {out}; see the log above")
    return out
