"""``fedeq simulate [CONFIG.yaml] [key=value ...]``: run a simulation on the config's engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedeq.cli.config_args import check_runnable, split_config_args
from fedeq.config import ConfigError, load_config

__all__ = ["add_simulate_parser", "cmd_simulate"]


def add_simulate_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to the ``fedeq`` subparsers ``sub``."""
    sim = sub.add_parser("simulate", help="run a federated simulation")
    sim.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config followed by dotted overrides such as rounds=5",
    )
    sim.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    sim.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        help="continue an interrupted run from its folder (its config.yaml and checkpoint.pkl)",
    )
    return sim


def _resume_config(resume: Path, args: list[str]) -> Any:
    """The config of the run in ``resume``, checked for resuming (``ConfigError`` naming ``--resume``)."""
    from fedeq.engines import resumable_engines, resume_refused

    if args:
        raise ConfigError("--resume", "takes no config or overrides", "--resume OUTPUT_DIR alone", args)
    if not (resume / "checkpoint.pkl").is_file() or not (resume / "config.yaml").is_file():
        raise ConfigError("--resume", "no checkpoint.pkl and config.yaml", "a fedeq run folder", str(resume))
    cfg = load_config(resume / "config.yaml")
    if resume_refused(cfg.engine) is not None:
        allowed = " | ".join(f"engine={name}" for name in resumable_engines())
        raise ConfigError("--resume", f"only runs on {allowed} can be resumed", allowed, cfg.engine)
    from fedeq.results.checkpoint import load_checkpoint

    try:  # a damaged checkpoint or journal stops here, not mid-run
        load_checkpoint(resume, truncate=False)
    except ValueError as err:
        problem = str(err).removeprefix("--resume: ")
        allowed = "checkpoint.pkl and checkpoint.journal as fedeq wrote them"
        raise ConfigError("--resume", problem, allowed, str(resume)) from err
    return cfg


def cmd_simulate(ns: argparse.Namespace) -> int:
    """Run the simulation ``ns`` describes; 2 on a bad config or argument, before any work."""
    resume = Path(ns.resume) if ns.resume else None
    try:
        if resume is not None:
            cfg = _resume_config(resume, ns.args)
        else:
            path, overrides = split_config_args(ns.args)
            cfg = load_config(path, overrides)
        check_runnable(cfg)
    except (ConfigError, ValueError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    from fedeq.engines.simulate import simulate

    out = simulate(cfg, quiet=ns.quiet, resume_dir=resume)
    print(f"results written to {out}")
    return 0
