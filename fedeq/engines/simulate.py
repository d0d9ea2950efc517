"""Launch a simulation of a validated config on its engine (looked up in :data:`fedeq.registry.ENGINES`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedeq.engines.base import get_engine, resume_refused
from fedeq.results.recorder import claim_run_dir, run_dir

__all__ = ["quiet_flower_logs", "simulate"]


def quiet_flower_logs(level: int = logging.WARNING) -> int:
    """Flower logs every message at INFO; keep the console for fedeq's round lines. Returns the level the
    ``flwr`` logger had, for the caller to restore."""
    logger = logging.getLogger("flwr")
    before = logger.level
    import flwr.common  # noqa: F401 - Flower sets its logger to DEBUG on first import: import it first

    logger.setLevel(level)
    return before


def simulate(
    cfg: Any,
    quiet: bool = False,
    resume_dir: Path | None = None,
    overwrite: bool = False,
    out_dir: Path | None = None,
) -> Path:
    """Run ``cfg`` on its engine and return the output folder (``resume_dir`` continues a run there).

    A new run goes to ``out_dir`` (default ``output_dir/run_name``, or a new timestamped folder). It never
    writes into a folder that holds an earlier run: that is a :class:`~fedeq.config.ConfigError` naming
    ``run_name``, unless ``overwrite`` (the folder's contents are then removed first).
    """
    engine = get_engine(cfg.engine)
    if resume_dir is not None and (refusal := resume_refused(cfg.engine)) is not None:
        raise ValueError(refusal)
    if resume_dir is not None:
        out = Path(resume_dir)
    else:
        out = claim_run_dir(out_dir or run_dir(cfg.output_dir, cfg.run_name), overwrite=overwrite)
    before = quiet_flower_logs(logging.ERROR if quiet else logging.WARNING)
    try:
        engine.run(cfg, out, quiet=quiet, resume=resume_dir is not None)
    finally:  # a library call leaves Flower's logger as it found it
        logging.getLogger("flwr").setLevel(before)
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without results in {out}; see the log above")
    return out
