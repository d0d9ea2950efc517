"""``fedeq sweep [CONFIG.yaml] [key=value ...] --grid KEY=V1,V2 ... [--seeds N]``: many runs, one table.

Every grid point (:mod:`fedeq.cli.sweep_plan`) runs once per seed, one after the other in this process, each
in its own folder ``DIR/runs/<grid point>/seed-<k>``. Running the same command again with the same ``--out``
skips the finished runs and resumes an interrupted one. At the end the sweep folder gets ``sweep.csv``,
``summary.csv`` (:mod:`fedeq.results.sweep_summary`) and plots (:mod:`fedeq.results.sweep_plots`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedeq.cli.config_args import check_runnable, split_config_args
from fedeq.cli.sweep_plan import GridPoint, SweepPlan, check_sweep_folder, make_plan, write_manifest
from fedeq.config import ConfigError

__all__ = ["DEFAULT_TARGET", "add_sweep_parser", "cmd_sweep", "run_state"]

DEFAULT_TARGET = 0.9
"""Default ``--target-acc``."""


def add_sweep_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``sweep`` to the ``fedeq`` subparsers ``sub``."""
    sw = sub.add_parser("sweep", help="run a grid of configs over several seeds and summarize them")
    sw.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="the base config: an optional YAML file followed by dotted overrides",
    )
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values (repeat for a cartesian product)",
    )
    seeds = sw.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N", help="seeds seed, seed+1, ..., seed+N-1 (default 1)")
    seeds.add_argument("--seed-list", metavar="S1,S2", help="these seeds instead of --seeds")
    sw.add_argument(
        "--out",
        metavar="DIR",
        help="the sweep folder (default output_dir/run_name, else output_dir/sweep-<time>)",
    )
    sw.add_argument(
        "--target-acc",
        type=float,
        default=DEFAULT_TARGET,
        metavar="ACC",
        help=f"the test accuracy the 'to target' numbers refer to (default {DEFAULT_TARGET})",
    )
    sw.add_argument("--verbose", action="store_true", help="the runs' own progress lines")
    sw.add_argument("--dry-run", action="store_true", help="validate and list the runs without running")
    return sw


def run_state(folder: Path, rounds: int) -> tuple[str, int | None]:
    """``("done", rounds)`` for a finished run, ``("resume", k)`` for one interrupted after round ``k``
    (its checkpoint), ``("new", None)`` otherwise."""
    from fedeq.results.checkpoint import checkpoint_round

    summary = folder / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if "wall_s" in data and int(data.get("rounds_completed") or 0) >= rounds:
            return "done", int(data["rounds_completed"])
    done = checkpoint_round(folder)
    return ("resume", done) if done is not None else ("new", None)


def command_line(ns: argparse.Namespace, out: Path) -> str:
    """The command that continues this sweep (the same one, with its ``--out``)."""
    parts = ["fedeq", "sweep", *ns.args]
    for item in ns.grid:
        parts += ["--grid", item]
    if ns.seed_list is not None:
        parts += ["--seed-list", ns.seed_list]
    elif ns.seeds is not None:
        parts += ["--seeds", str(ns.seeds)]
    parts += ["--out", str(out)]
    if ns.target_acc != DEFAULT_TARGET:
        parts += ["--target-acc", f"{ns.target_acc:g}"]
    return shlex.join(parts)


def _plan(ns: argparse.Namespace) -> tuple[SweepPlan, dict[tuple[str, int], Any], bool]:
    """Parse, expand and check everything before any run: the plan, each run's config, and whether the
    sweep folder already holds this sweep."""
    if not 0.0 < ns.target_acc <= 1.0:
        raise ConfigError("--target-acc", "out of range", "a test accuracy in (0, 1]", ns.target_acc)
    path, overrides = split_config_args(ns.args)
    plan = make_plan(path, overrides, ns.grid, (ns.seeds, ns.seed_list), Path(ns.out) if ns.out else None)
    configs = {(p.slug, s): plan.run_config(p, s) for p, s in plan.runs()}
    owned = check_sweep_folder(plan)
    from fedeq.server.app import strategy_for

    for check in (strategy_for, check_runnable):  # the quick check of every grid point first
        for point in plan.points:
            try:
                check(configs[point.slug, plan.seeds[0]])  # strategy; data, model and strategy
            except (ConfigError, ValueError) as err:
                raise ValueError(f"{err} (grid point {' '.join(point.overrides)})") from None
    return plan, configs, owned


def _start_ray(cfgs: list[Any]) -> bool:
    """Start one local Ray for every run when they all run on ``engine=ray`` without a cluster address
    (sized for the largest; each run then skips Ray's start-up). Whether it was started here."""
    if not cfgs or any(c.engine != "ray" or c.ray.address for c in cfgs):
        return False
    import ray

    from fedeq.engines.ray.cluster import start_ray
    from fedeq.engines.ray.engine import caller_sigterm_handler
    from fedeq.engines.ray.pools import plan_grid

    if ray.is_initialized():
        return False
    with caller_sigterm_handler():
        start_ray(None, num_cpus=max(plan_grid(c)[2] for c in cfgs))
    return True


def _run(folder: Path, cfg: Any, state: str, verbose: bool) -> None:
    """Run (``state`` ``new``) or resume one run in ``folder``."""
    from fedeq.cli.resume import resume_config
    from fedeq.engines import resume_refused
    from fedeq.engines.simulate import simulate
    from fedeq.results.checkpoint import checkpoint_round
    from fedeq.results.recorder import run_taken

    if state == "resume" and resume_refused(cfg.engine) is None:
        simulate(resume_config(folder, []), quiet=not verbose, resume_dir=folder)
        return
    try:  # a folder without a checkpoint to continue (stopped before round 1, or a Flower run) starts over
        simulate(cfg, quiet=not verbose, overwrite=run_taken(folder), out_dir=folder)
    except KeyboardInterrupt:
        if checkpoint_round(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _acc(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _run_line(folder: Path) -> str:
    from fedeq.results.run_report import read_report

    report = read_report(folder)
    line = f"final {_acc(report.final_test_acc)}, best {_acc(report.best_test_acc)}"
    if report.best_round is not None:
        line += f" (round {report.best_round})"
    if report.final_personal_acc is not None:
        worst = _acc(report.final_personal_worst10)
        line += f", personalised {_acc(report.final_personal_acc)} (worst 10% {worst})"
    failure = report.failure()
    return f"{line}; {failure}" if failure else line


def _execute(plan: SweepPlan, configs: dict[tuple[str, int], Any], verbose: bool) -> list[str]:
    """Run every run of ``plan`` that is not finished, printing one line each; the failed runs' lines."""
    runs = plan.runs()
    states = {(p.slug, s): run_state(plan.run_dir(p, s), configs[p.slug, s].rounds) for p, s in runs}
    pending = [configs[key] for key, (state, _) in states.items() if state != "done"]
    failed: list[str] = []
    started = _start_ray(pending)
    try:
        for i, (point, seed) in enumerate(runs, 1):
            folder = plan.run_dir(point, seed)
            state, done = states[point.slug, seed]
            head = f"[{i}/{len(runs)}] {point.label()}, seed={seed}:"
            if state == "done":
                print(f"{head} finished earlier; {_run_line(folder)}", flush=True)
                continue
            doing = f"{head} resuming after round {done}," if state == "resume" else head
            print(doing, end="\n" if verbose else " ", flush=True)  # the run's own lines come in between
            t0 = time.perf_counter()
            try:
                _run(folder, configs[point.slug, seed], state, verbose)
            except KeyboardInterrupt:
                print("interrupted" if not verbose else f"{head} interrupted", flush=True)
                raise
            except Exception as err:  # one failed run does not stop the sweep
                failed.append(f"{head} failed ({type(err).__name__}: {' '.join(str(err).split())})")
                print(failed[-1], file=sys.stderr, flush=True)
                continue
            line = _run_line(folder)
            if "no client update" in line:
                failed.append(f"{head} {line}")
            took = f"{line}, {time.perf_counter() - t0:.1f} s"
            print(f"{head} {took}" if verbose else took, flush=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    return failed


def _dry_run(plan: SweepPlan, configs: dict[tuple[str, int], Any]) -> None:
    print(f"sweep folder {plan.out}: {len(plan.points)} grid point(s) x {len(plan.seeds)} seed(s)")
    for point, seed in plan.runs():
        state, done = run_state(plan.run_dir(point, seed), configs[point.slug, seed].rounds)
        what = {"done": "finished", "resume": f"resume after round {done}", "new": "to run"}[state]
        print(f"  {point.label()}, seed={seed}: {what} ({plan.run_dir(point, seed).relative_to(plan.out)})")


def cmd_sweep(ns: argparse.Namespace) -> int:
    """Run the sweep ``ns`` describes, write its tables and plots and print the summary.

    Exit status: 0 done; 1 a run failed or accepted no client update (the others still ran); 2 a bad
    config, grid or sweep folder (before any run); 130 / 143 stopped by SIGINT / SIGTERM.
    """
    try:
        plan, configs, _ = _plan(ns)
    except (ConfigError, ValueError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    if ns.dry_run:
        _dry_run(plan, configs)
        return 0
    from fedeq.engines.deploy.processes import signals_raise

    write_manifest(plan)
    try:
        with signals_raise():
            failed = _execute(plan, configs, ns.verbose)
    except KeyboardInterrupt as stop:
        line = f"sweep interrupted; finished runs are kept, continue with: {command_line(ns, plan.out)}"
        print(line, file=sys.stderr, flush=True)
        return 128 + int(getattr(stop, "signum", signal.SIGINT))
    from fedeq.cli.sweep_table import print_sweep_summary

    print_sweep_summary(plan, ns.target_acc)
    if failed:
        print(f"fedeq: error: {len(failed)} run(s) failed; the same command retries them:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def sweep_runs(plan: SweepPlan) -> list[Any]:
    """The :class:`~fedeq.results.sweep_summary.SweepRun` of every run of ``plan``."""
    from fedeq.results.sweep_summary import SweepRun

    def run(point: GridPoint, seed: int) -> SweepRun:
        return SweepRun(point.label(), point.values, seed, plan.run_dir(point, seed))

    return [run(p, s) for p, s in plan.runs()]
