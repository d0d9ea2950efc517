"""fedeq's Ray device engine (``engine: ray``): per-tier actor pools behind a ``flwr.serverapp.Grid``.

This module only registers the engine; Ray and Flower are imported when a run starts
(:mod:`fedeq.engines.ray.engine`, :mod:`fedeq.engines.ray.grid`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedeq.engines.base import Engine
from fedeq.registry import ENGINES

__all__ = ["RayEngine"]


@ENGINES.register("ray")
class RayEngine(Engine):
    """Heterogeneous tiers side by side, each in its own Ray actor pool; runs can be resumed."""

    supports_resume = True

    def run(self, cfg: Any, out_dir: Path, quiet: bool = False, resume: bool = False) -> None:
        from fedeq.engines.ray.engine import run_ray_simulation

        run_ray_simulation(cfg, out_dir, quiet=quiet, resume=resume)
