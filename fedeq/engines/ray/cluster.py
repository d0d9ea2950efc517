"""Start or join the Ray cluster that the device engine's actor pools run on."""

from __future__ import annotations

import os
from typing import Any

import ray

__all__ = ["start_ray"]


def start_ray(address: str | None = None, num_cpus: float | None = None, quiet: bool = True) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one (no dashboard).

    Locally the logical CPU count is at least what the tiers' pools ask for, so every pool can hold its
    actors (several per physical core, each with its own thread budget).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": not quiet,
        "configure_logging": False,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
