"""Cohorts vs. one client per call vs. Flower's engine, side by side in one run.

``python simulations/benchmarks/cohort.py [--quick] [--gpu] [options]``

*CPU comparison* (always, unless ``--gpu``): the default config (``fedeq simulate`` defaults: digits,
Dirichlet, four tiers) with ``num_clients = clients_per_round = --clients`` (100), the same seed, run
three times one after another in this invocation, each in a fresh child process (its own Ray instance and
its own peak memory): fedeq's engine with ``ray.cohort_size=1`` (the *per-client engine*), with
``ray.cohort_size=auto`` (*cohorts*), and Flower's engine (``engine=flower``: ``run_simulation`` with
``num_supernodes = num_clients``, the first tier's resources per client). Targets: cohorts >= 4x faster
than the per-client engine and >= 10x faster than Flower's; training share of the cohort run >= 90%.

*1,000 clients per round* (full mode only): cohorts, and the per-client engine unless
``--no-scale-per-client``; rounds per minute and peak memory. digits holds 1,437 training examples, which
Dirichlet cannot split over 1,000 clients; the run says so and uses a synthetic npz of 8×8 images instead
(``engine_bench.scale.make_npz``), 18 images per client, about the size of a digits client at 100 clients.

*GPU* (``--gpu``, instead of the CPU runs): ConvDEQ 64 channels on 32×32 images, 64 clients per round,
5 steps of batch 64, Anderson 12 / IFT 8; client updates per second of cohorts, the per-client engine and
Flower's engine at each GPU share given (the best share of each counts). Target: cohorts >= 5x Flower's.
Without a CUDA device it stops with a message and exit status 2.

Definitions (rounds after the first, which starts the actors, are measured):

- *median round wall time*: median of ``wall_s`` of ``rounds.csv`` (time from the previous round's close
  to this one's) over rounds 2..R; *rounds/min* = 60 / that; *client updates/s* = Σ ``clients_ok`` /
  Σ ``wall_s`` over rounds 2..R.
- *training share*: Σ ``compute_cpu_s`` of ``clients.csv`` over rounds 2..R (CPU seconds inside local
  training; a cohort's training CPU divided evenly among its clients, so the sum is the cohorts' training
  CPU) divided by the CPU time used by the run in the same window: the driver process plus every process
  below it (the actors and Ray's own processes, via psutil, as ``engine_bench/efficiency.py``'s CPU budget
  counts "the CPU used"). The window runs from the dispatch of round 2's train messages to the arrival of
  the last round's replies. *train/actor CPU* is the same CPU over the CPU of the actors alone (the
  processes that run the clients: what the engine spends per client, without the server's work, Ray's
  own processes and the driver). *train/capacity* is the same CPU over the window's wall time × cores
  (efficiency's machine view).
- *train calls/round*: actor calls that answered clients, read from ``clients.csv`` (clients of one tier
  with equal ``compute_s`` and ``compute_cpu_s`` came from one cohort); the largest call in brackets.
- *peak RSS*: each process's ``VmHWM`` read at the end of the round loop (the actors: fedeq's
  ``grid.actor_stats()`` pids, for Flower the ``ray::`` worker processes); *Σ peak RSS all*: the driver
  and every process below it (shared libraries counted once per process); *PSS*: the summed proportional
  set size, sampled every 0.5 s (1,000-client runs only).

The last line is ``speedup_vs_per_client X.XX speedup_vs_flower Y.YY training_share Z.ZZ`` (ratios of
median round wall times; the cohort run's training share); with ``--gpu``
``gpu_speedup_vs_per_client X.XX gpu_speedup_vs_flower Y.YY`` (ratios of client updates per second).

Examples::

    python simulations/benchmarks/cohort.py --quick                 # CPU comparison, 4 rounds (minutes)
    python simulations/benchmarks/cohort.py                         # + 1,000 clients per round
    python simulations/benchmarks/cohort.py --gpu                   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parents[1], HERE):  # the checkout (fedeq, clients, strategies) and the helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cohort_bench.gpu import section_gpu  # noqa: E402
from cohort_bench.runner import ChildFailed, child_main, run_child  # noqa: E402
from cohort_bench.summary import EngineNumbers, engine_table, final_line, numbers, ratio, ratio_table  # noqa: E402
from engine_bench.report import machine_line  # noqa: E402

ENGINES = (  # per-client: fedeq's engine, one client per call; flower: Flower's run_simulation
    ("per-client", "ray", ["ray.cohort_size=1"]),
    ("cohorts", "ray", ["ray.cohort_size=auto"]),
    ("flower", "flower", []),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU comparison alone, 4 rounds")
    p.add_argument("--rounds", type=int, help="rounds of the CPU comparison (default 10; --quick 4)")
    p.add_argument("--clients", type=int, default=100, help="num_clients = clients_per_round (default 100)")
    p.add_argument("--flower-rounds", type=int, help="rounds of Flower's engine (default: --rounds)")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE", help="for every run")
    p.add_argument("--child-timeout", type=float, default=1200.0, help="seconds per run")
    g = p.add_argument_group("1,000 clients per round (full mode)")
    g.add_argument("--scale-clients", type=int, default=1000)
    g.add_argument("--scale-rounds", type=int, default=3)
    g.add_argument("--no-scale-per-client", action="store_true", help="cohorts only at 1,000 clients")
    g = p.add_argument_group("GPU")
    g.add_argument(
        "--gpu", action="store_true", help="the GPU comparison (needs CUDA) instead of the CPU one"
    )
    g.add_argument("--gpu-clients", type=int, default=64)
    g.add_argument("--gpu-rounds", type=int, default=4)
    g.add_argument("--gpu-cohort-shares", type=float, nargs="+", default=[1.0, 0.5])
    g.add_argument("--gpu-per-client-shares", type=float, nargs="+", default=[0.25])
    g.add_argument("--gpu-flower-shares", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 4 if args.quick else 10
    if args.rounds < 1 or args.clients < 1:
        p.error("--rounds and --clients must be >= 1")
    args.flower_rounds = args.flower_rounds or args.rounds
    return args


def measure(
    label: str, engine: str, overrides: list[str], out: Path, timeout: float, pss: bool = False
) -> EngineNumbers | None:
    """One run in a child process; its numbers, or ``None`` (with the reason printed) when it failed."""
    spec = {"label": label, "engine": engine, "overrides": overrides, "out": str(out), "pss": pss}
    try:
        res = run_child(spec, timeout)
    except ChildFailed as err:
        print(f"  {label}: {err}", flush=True)
        return None
    n = numbers(label, res)
    print(
        f"  {label}: median round {n.median_round_s:.3f} s, {n.updates_per_s:.1f} client updates/s, "
        f"{n.calls_per_round:.1f} train calls/round, run {n.run_s:.0f} s",
        flush=True,
    )
    return n


def section_cpu(args: argparse.Namespace, tmp: Path) -> str:
    """The three engines at ``--clients`` clients per round; returns the final line."""
    base = [f"num_clients={args.clients}", f"clients_per_round={args.clients}", *args.overrides]
    rows: dict[str, EngineNumbers] = {}
    for i, (label, engine, extra) in enumerate(ENGINES):
        rounds = args.flower_rounds if engine == "flower" else args.rounds
        n = measure(label, engine, [*base, f"rounds={rounds}", *extra], tmp / f"cpu-{i}", args.child_timeout)
        if n is not None:
            rows[label] = n
    engine_table(
        f"CPU: default config, {args.clients} clients/round, rounds 2..R (R = {args.rounds}, "
        f"Flower {args.flower_rounds}); {machine_line()}",
        list(rows.values()),
    )
    nan = float("nan")
    pc, co, fl = (rows[label].median_round_s if label in rows else nan for label, _, _ in ENGINES)
    share = rows[ENGINES[1][0]].training_share if ENGINES[1][0] in rows else nan
    vs_pc, vs_fl = ratio(pc, co), ratio(fl, co)
    ratio_table(
        "CPU ratios (median round wall time)",
        [
            ("per-client engine / cohorts", vs_pc, ">= 4"),
            ("Flower's engine / cohorts", vs_fl, ">= 10"),
            ("training share of the cohort run", share, ">= 0.90"),
        ],
    )
    return final_line(vs_pc, vs_fl, share)


def scale_data(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Overrides for the data of the 1,000-client runs: the default data if it can make that many
    partitions, else a synthetic npz (the reason is printed)."""
    from fedeq.cli.config_args import check_runnable
    from fedeq.config import ConfigError, load_config

    n = args.scale_clients
    try:
        check_runnable(load_config(None, [f"num_clients={n}", f"clients_per_round={n}", *args.overrides]))
        return []
    except ConfigError as err:
        print(f"  the default data cannot serve {n:,} clients: {err}", flush=True)
    from engine_bench.scale import make_npz

    npz = tmp / "synthetic-8x8.npz"
    make_npz(npz, 18 * n, 8)
    print(f"  using a synthetic npz instead: {18 * n:,} images of 8x8, 10 classes ({npz.name})", flush=True)
    return ["data.name=npz", f"data.path={npz}"]


def section_scale(args: argparse.Namespace, tmp: Path) -> None:
    """Rounds per minute and peak memory at ``--scale-clients`` clients per round."""
    n = args.scale_clients
    base = [f"num_clients={n}", f"clients_per_round={n}", f"rounds={args.scale_rounds}", *args.overrides]
    base = [*base, *scale_data(args, tmp)]
    rows = []
    for i, (label, _, extra) in enumerate(ENGINES[:2]):
        if i == 0 and args.no_scale_per_client:
            continue
        res = measure(label, "ray", [*base, *extra], tmp / f"scale-{i}", args.child_timeout, pss=True)
        if res is not None:
            rows.append(res)
    engine_table(f"CPU: {n:,} clients/round, rounds 2..{args.scale_rounds}; {machine_line()}", rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return 0
    args = parse_args(argv)
    t0 = time.perf_counter()
    print(f"machine: {machine_line()}, python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedeq-cohort-") as tmpdir:
        tmp = Path(tmpdir)
        if args.gpu:
            return section_gpu(args, tmp)
        line = section_cpu(args, tmp)
        if not args.quick:
            section_scale(args, tmp)
    print(f"benchmark wall time {time.perf_counter() - t0:.0f} s; {machine_line()}", flush=True)
    print(line, flush=True)
    return 1 if "nan" in line else 0  # a run that failed leaves its ratio undefined


if __name__ == "__main__":
    raise SystemExit(main())
