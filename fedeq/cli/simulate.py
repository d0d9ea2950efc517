"""``fedeq simulate [CONFIG.yaml] [key=value ...]``: run a simulation on the config's engine."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from fedeq.cli.config_args import check_runnable, split_config_args
from fedeq.cli.resume import resume_config
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
        help="continue an interrupted run from its folder (its config.yaml and checkpoint.pkl); "
        "rounds=N extends it to N rounds",
    )
    sim.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir/run_name (once the config is valid)",
    )
    sim.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan (tiers, data, resources, model) without running or writing",
    )
    return sim


def _interrupted(out: Path, cfg: Any, fresh: bool) -> str:
    """The line printed when a run was stopped by a signal: the round its checkpoint holds and how to go on
    (a new run stopped before its first round is removed: there is nothing to continue)."""
    from fedeq.engines import resume_refused
    from fedeq.results.checkpoint import checkpoint_round

    done = checkpoint_round(out)
    if done is None:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        return "interrupted before round 1 completed; nothing to continue"
    if resume_refused(cfg.engine) is not None:
        return f"interrupted after round {done}; runs on engine={cfg.engine} cannot be resumed ({out})"
    return f"interrupted after round {done}; continue with fedeq simulate --resume {out}"


def cmd_simulate(ns: argparse.Namespace) -> int:
    """Run the simulation ``ns`` describes and print its closing summary.

    Exit status: 0 done; 1 no client update was accepted in any round; 2 a bad config or argument (before
    any work); 128 + the signal number when stopped by SIGINT (130) or SIGTERM (143), after cleaning up.
    """
    from fedeq.results.recorder import check_new_run, check_replaceable, run_dir

    resume = Path(ns.resume) if ns.resume else None
    try:
        if resume is not None:
            if ns.overwrite:
                raise ConfigError("--overwrite", "cannot be combined with --resume", "one of them", True)
            cfg = resume_config(resume, ns.args)
            out = resume
        else:
            path, overrides = split_config_args(ns.args)
            cfg = load_config(path, overrides)
            out = run_dir(cfg.output_dir, cfg.run_name)
            if ns.overwrite:
                check_replaceable(out)  # --overwrite clears a run folder, never anything else
            else:
                check_new_run(out)
        check_runnable(cfg)
    except (ConfigError, ValueError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    if ns.dry_run:
        from fedeq.cli.plan import print_plan

        print_plan(cfg, out)
        return 0
    from fedeq.cli.summary import print_summary
    from fedeq.engines.deploy.processes import signals_raise
    from fedeq.engines.simulate import simulate
    from fedeq.results.run_report import read_report

    try:
        with signals_raise():
            simulate(cfg, quiet=ns.quiet, resume_dir=resume, overwrite=ns.overwrite, out_dir=out)
    except KeyboardInterrupt as stop:  # SIGINT, SIGTERM, SIGHUP: the engine has cleaned up by now
        print(_interrupted(out, cfg, fresh=resume is None), file=sys.stderr, flush=True)
        return 128 + int(getattr(stop, "signum", signal.SIGINT))
    report = read_report(out)
    print_summary(report)
    failure = report.failure()
    if failure is not None:
        print(f"fedeq: error: {failure}", file=sys.stderr)
        return 1
    return 0
