"""The command line of ``simulations/benchmarks/engine.py``: sections, options, the report."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from engine_bench import __doc__ as DESCRIPTION
from engine_bench.efficiency import section_efficiency
from engine_bench.overhead import section_overhead
from engine_bench.report import Report, machine_line
from engine_bench.runner import child_main
from engine_bench.scale import section_scale
from engine_bench.throughput import section_throughput

SECTIONS = ("overhead", "efficiency", "scale", "throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"any of {', '.join(SECTIONS)} (default: all but throughput)",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds, repeats and scale points")
    p.add_argument("--repeat", type=int, default=3, help="runs per engine (medians)")
    p.add_argument("--csv", type=Path, help="write every number here (long format)")
    p.add_argument("--child-timeout", type=float, default=900.0, help="seconds per measurement process")
    p.add_argument(
        "--pipeline",
        type=int,
        help="calls in flight per busy actor of fedeq's engine (default: the engine's)",
    )
    p.add_argument(
        "--no-share-partitions",
        action="store_true",
        help="let every actor partition the data itself (as before the driver shared its partitions)",
    )
    g = p.add_argument_group("overhead")
    g.add_argument("--actors", type=int, default=2, help="1-CPU actors of both engines")
    g.add_argument("--clients", type=int, default=100, help="clients per round for the per-call cost")
    g.add_argument("--call-rounds", type=int, default=11, help="rounds at --clients (the first is left out)")
    g.add_argument("--floor-rounds", type=int, default=41, help="rounds at 1 client (the first is left out)")
    g.add_argument("--floats", type=int, default=10_000, help="float32 values echoed per call")
    g = p.add_argument_group("efficiency")
    g.add_argument("--eff-rounds", type=int, default=25)
    g.add_argument("--eff-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    g = p.add_argument_group("scale")
    g.add_argument("--scale-clients", type=int, nargs="+", default=[1000, 3000, 10000])
    g.add_argument("--images", type=int, default=60_000)
    g.add_argument("--image-size", type=int, default=8)
    g.add_argument(
        "--scale-overrides",
        nargs="*",
        default=["model.hidden=32", "eval.budgets=[1,4]"],
        metavar="KEY=VALUE",
        help="small model and a short final evaluation by default",
    )
    g = p.add_argument_group("throughput (GPU)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--gpu-share", type=float, default=0.0, help="GPU fraction per client (0.25: 4 share one)")
    g.add_argument("--cpus-per-client", type=float, default=1.0)
    g.add_argument("--tp-clients", type=int, default=16)
    g.add_argument("--tp-rounds", type=int, default=4)
    g.add_argument("--tp-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if not args.sections:
        args.sections = list(SECTIONS[:3])
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    if args.quick:
        args.repeat = 1
        args.call_rounds, args.floor_rounds = 3, 6
        args.eff_rounds = min(args.eff_rounds, 4)
        args.scale_clients = args.scale_clients[:1]
        args.tp_rounds = min(args.tp_rounds, 3)
    if args.device == "cpu" and args.gpu_share:
        p.error("--gpu-share needs --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[4])
        return 0
    args = parse_args(argv)
    report = Report()
    print(f"machine: {machine_line()}, python {sys.version.split()[0]}", flush=True)
    print(
        f"fedeq engine: pipeline={args.pipeline or 'default'}, "
        f"partitions {'computed by every actor' if args.no_share_partitions else 'shared by the driver'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fedeq-engine-") as tmpdir:
        tmp = Path(tmpdir)
        for section in args.sections:
            t0 = time.perf_counter()
            if section == "overhead":
                section_overhead(args, report)
            elif section == "efficiency":
                section_efficiency(args, report, tmp)
            elif section == "scale":
                section_scale(args, report, tmp)
            else:
                section_throughput(args, report)
            print(f"  ({section}: {time.perf_counter() - t0:.0f} s; {machine_line()})", flush=True)
    if args.csv:
        report.write_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0
