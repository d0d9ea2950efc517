"""Flower's own simulation engine (``engine: flower``): every client gets the same Ray resources."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedeq.engines.base import Engine
from fedeq.registry import ENGINES

__all__ = ["FlowerEngine", "quiet_run_simulation_banner", "run_flower_simulation"]

RUN_SIMULATION_DEPRECATION = "The `run_simulation` function is deprecated"
"""Start of the banner Flower 1.41 logs on every ``flwr.simulation.run_simulation`` call."""


class _DropRunSimulationBanner(logging.Filter):
    """Drops Flower's ``DEPRECATED FEATURE`` record about ``run_simulation`` itself, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            str(record.msg).startswith("DEPRECATED FEATURE")
            and bool(args)
            and str(args[0]).startswith(RUN_SIMULATION_DEPRECATION)
        )


@contextlib.contextmanager
def quiet_run_simulation_banner() -> Iterator[None]:
    """``run_simulation`` is Flower's only in-process entry point: fedeq calls it on purpose (``flwr run`` is
    the out-of-process one), so its deprecation banner is not for the user."""
    flwr_logger = logging.getLogger("flwr")
    banner_filter = _DropRunSimulationBanner()
    flwr_logger.addFilter(banner_filter)
    try:
        yield
    finally:
        flwr_logger.removeFilter(banner_filter)


def run_flower_simulation(cfg: Any, out: Path, quiet: bool = False) -> None:
    """Flower's own simulation runtime: every client gets the same Ray resources (the first tier's)."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from fedeq.engines.stoppable import stoppable_server_app

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning on every start
    tier0 = cfg.devices.tiers[0]
    backend_config = {
        "client_resources": {"num_cpus": float(tier0.num_cpus), "num_gpus": float(tier0.num_gpus)},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    stop = threading.Event()
    with quiet_run_simulation_banner():
        try:
            run_simulation(
                server_app=stoppable_server_app(cfg, out, quiet, stop),
                client_app=client_app,
                num_supernodes=cfg.num_clients,
                backend_config=backend_config,
            )
        except BaseException:  # Ctrl-C / SIGTERM: the ServerApp's thread stops waiting for replies that
            stop.set()  # will not come, and Flower's Ray backend goes down with the run
            import ray

            if ray.is_initialized():
                ray.shutdown()
            raise
        finally:
            stop.set()


@ENGINES.register("flower")
class FlowerEngine(Engine):
    """Flower's simulation runtime; it owns the round loop, so its runs cannot be resumed."""

    supports_resume = False
    no_resume_reason = "Flower's runtime owns the loop"

    def run(self, cfg: Any, out_dir: Path, quiet: bool = False, resume: bool = False) -> None:
        if resume:
            raise ValueError(f"engine=flower: {self.no_resume_reason}; it cannot resume a run")
        run_flower_simulation(cfg, out_dir, quiet=quiet)
