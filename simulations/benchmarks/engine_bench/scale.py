"""``scale``: start time and peak memory with 1k-10k registered clients (synthetic npz data)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from engine_bench.probe import run_probed
from engine_bench.procs import PssSampler, self_peak_rss
from engine_bench.report import TARGETS, Report, median, table
from engine_bench.runner import run_child


def make_npz(path: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` synthetic ``size``×``size`` uint8 images of 10 classes (a per-class pattern plus noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (10, size, size))
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = np.clip(templates[y] + rng.normal(0, 40, (n, size, size)), 0, 255).astype(np.uint8)
    np.savez(path, x=x, y=y.astype(np.int64))


def child_scale(spec: dict[str, Any]) -> dict[str, Any]:
    t_main = time.time()
    import ray  # noqa: F401
    import torch  # noqa: F401

    from fedeq.config import load_config
    from fedeq.engines.ray.engine import run_ray_simulation  # noqa: F401

    t_imports = time.time()
    out = Path(spec["out"])
    cfg = load_config(
        None,
        [
            "data.name=npz",
            f"data.path={spec['npz']}",
            f"num_clients={spec['clients']}",
            f"clients_per_round={spec['per_round']}",
            f"rounds={spec['rounds']}",
            "engine=ray",
            f"output_dir={out.parent}",
            *spec["overrides"],
        ],
    )
    with PssSampler() as pss:
        probe = run_probed(cfg, out, spec)
    probe.marks.update(child_main=t_main, imports_done=t_imports)
    actors = probe.final_stats
    return {
        "marks": probe.marks,
        "cpu_marks": probe.cpu_marks,
        "eval0_s": probe.eval_before_dispatch_s,
        "peak_pss_bytes": pss.peak,
        "driver_peak_pss_bytes": pss.peak_driver,
        "driver_peak_bytes": self_peak_rss(),
        "actor_peaks_bytes": [st["peak_rss_bytes"] or 0 for st in actors],
        "actor_first_call_s": [st["first_call_s"] for st in actors],
        "tree": probe.tree,
        "round_walls_s": [r["wall_s"] for r in probe.rounds],
    }


def section_scale(args: argparse.Namespace, report: Report, tmp: Path) -> None:
    npz = tmp / f"synthetic-{args.images}x{args.image_size}.npz"
    if not npz.exists():
        make_npz(npz, args.images, args.image_size)
    rows, mem_rows = [], []
    gib, mib = 2.0**30, 2.0**20
    for n in args.scale_clients:
        spec = {
            "npz": str(npz),
            "clients": n,
            "per_round": min(100, n),
            "rounds": 3,
            "out": str(tmp / f"scale-{n}"),
            "overrides": list(args.scale_overrides),
            "pipeline": args.pipeline,
            "share_partitions": not args.no_share_partitions,
        }
        res = run_child("scale", spec, args.child_timeout)
        m, t0 = res["marks"], res["spawned_at"]
        start = m["first_dispatch"] - t0
        server_setup = m["first_dispatch"] - m["actors_ready"]
        phases = {
            "imports": m["imports_done"] - t0,
            "ray+grid": m["grid_built"] - m["make_grid_start"],
            "data (left after Ray start)": m["partitions_shared"] - m["partition_start"],
            "actors ready": m["actors_ready"] - m["partitions_shared"],
            "server setup": server_setup - res["eval0_s"],
            "central eval 0": res["eval0_s"],
        }
        driver_cpu = res["cpu_marks"]["first_dispatch"]
        actor_peaks = res["actor_peaks_bytes"]
        hwm_total = res["driver_peak_bytes"] + res["tree"]["peak_sum_bytes"]
        detail = f"num_clients={n}"
        for metric, value, unit in (
            ("start_s", start, "s"),
            ("driver_cpu_before_dispatch_s", driver_cpu, "s"),
            ("round1_s", res["round_walls_s"][0], "s"),
            ("round_later_s", median(res["round_walls_s"][1:]), "s"),
            ("driver_peak_rss", res["driver_peak_bytes"] / gib, "GiB"),
            ("actor_peak_rss_max", max(actor_peaks) / gib, "GiB"),
            ("actors_peak_rss_sum", sum(actor_peaks) / gib, "GiB"),
            ("all_processes_peak_rss_sum", hwm_total / gib, "GiB"),
            ("peak_pss_total", res["peak_pss_bytes"] / gib, "GiB"),
        ):
            report.add("scale", "fedeq", metric, value, unit, detail)
        for name, value in phases.items():
            report.add("scale", "fedeq", f"start_phase:{name}", value, "s", detail)
        rows.append(
            [
                f"{n:,}",
                f"{start:.1f}",
                " + ".join(f"{v:.1f}" for v in phases.values()),
                f"{driver_cpu:.1f}",
                f"{res['round_walls_s'][0]:.1f} / {median(res['round_walls_s'][1:]):.2f}",
            ]
        )
        mem_rows.append(
            [
                f"{n:,}",
                f"{res['driver_peak_bytes'] / mib:.0f}",
                f"{len(actor_peaks)} x {median(actor_peaks) / mib:.0f}",
                f"{res['tree']['procs']}",
                f"{hwm_total / gib:.2f}",
                f"{res['peak_pss_bytes'] / gib:.2f}",
            ]
        )
    title = (
        f"Scale: synthetic npz {args.images:,} x {args.image_size}x{args.image_size}, "
        f"100 clients/round, 3 rounds, {' '.join(args.scale_overrides)}"
    )
    table(
        f"{title}: start (target <= {TARGETS['start_s']:g} s at 10k)",
        [
            "registered clients",
            "start s",
            "= " + " + ".join(["imports", "ray+grid", "data left", "actors ready", "server", "eval 0"]),
            "driver CPU s",
            "round 1 / later s",
        ],
        rows,
    )
    table(
        f"{title}: memory (target <= {TARGETS['peak_rss_gb']:g} GB at 10k)",
        [
            "registered clients",
            "driver peak RSS MiB",
            "actors peak RSS MiB",
            "Ray processes",
            "Σ peak RSS, all GiB",
            "peak Σ PSS GiB",
        ],
        mem_rows,
    )
