"""``efficiency``: the default workload at 100 clients per round on fedeq's engine, busy vs. wall time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from engine_bench.probe import run_probed
from engine_bench.report import Report, table
from engine_bench.runner import run_child


def child_efficiency(spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from fedeq.config import load_config

    out = Path(spec["out"])
    cfg = load_config(
        None,
        [
            f"num_clients={spec['clients']}",
            f"clients_per_round={spec['clients']}",
            f"rounds={spec['rounds']}",
            "engine=ray",
            f"output_dir={out.parent}",
            *spec["overrides"],
        ],
    )
    probe = run_probed(cfg, out, spec)
    clients = pd.read_csv(out / "clients.csv")
    rounds = pd.read_csv(out / "rounds.csv")
    tiers = [t.name for t in cfg.devices.tiers]
    per_round = []
    prev: dict[tuple[int, str], float] = {}
    for i, r in enumerate(probe.rounds, start=1):
        busy = {t: 0.0 for t in tiers}
        cpu = {t: 0.0 for t in tiers}
        for st in r["actors"]:
            for key, acc in (("busy_s", busy), ("cpu_s", cpu)):
                acc[st["tier"]] += st[key] - prev.get((st["pid"], key), 0.0)
                prev[(st["pid"], key)] = st[key]
        rows = clients[clients["round"] == i]
        compute = {t: float(rows[rows.tier == t].compute_s.fillna(0).sum()) for t in tiers}
        compute_cpu = {t: float(rows[rows.tier == t].compute_cpu_s.fillna(0).sum()) for t in tiers}
        per_round.append(
            {
                "round": i,
                "grid_wall_s": r["wall_s"],
                "round_wall_s": float(rounds.loc[rounds["round"] == i, "wall_s"].iloc[0]),
                "busy_s": busy,
                "cpu_s": cpu,
                "compute_s": compute,
                "compute_cpu_s": compute_cpu,
                "ok": int((rows.status == "ok").sum()),
                "calls": r["messages"],
            }
        )
    sizes = {t: sum(1 for st in probe.final_stats if st["tier"] == t) for t in tiers}
    actor_pids = sorted({st["pid"] for r in probe.rounds for st in r["actors"]})
    snaps = [{**sn, "tree_cpu": {str(pid): cpu for pid, cpu in sn["tree_cpu"].items()}} for sn in probe.snaps]
    return {
        "rounds": per_round,
        "pool_sizes": sizes,
        "marks": probe.marks,
        "cores": os.cpu_count(),
        "snaps": snaps,
        "actor_pids": actor_pids,
    }


def cpu_budget(res: dict[str, Any], report: Report) -> None:
    """Where the machine's CPU went from the start of round 2 to the end: wall × cores split into local
    training, the rest of the ClientApp, the actors outside the ClientApp (Ray's worker, message
    (de)serialisation), the driver (ServerApp, strategy, engine), Ray's own processes, and idle."""
    snaps = res["snaps"]
    if len(snaps) < 3:
        return
    first, last = snaps[1], snaps[-1]
    steady = res["rounds"][1:]
    actor_pids = {str(pid) for pid in res["actor_pids"]}

    def delta(group: set[str] | None) -> float:
        pids = set(last["tree_cpu"]) | set(first["tree_cpu"])
        chosen = [p for p in pids if (p in group if group is not None else p not in actor_pids)]
        return sum(last["tree_cpu"].get(p, 0.0) - first["tree_cpu"].get(p, 0.0) for p in chosen)

    capacity = (last["t"] - first["t"]) * res["cores"]
    training = sum(sum(r["compute_cpu_s"].values()) for r in steady)
    app = sum(sum(r["cpu_s"].values()) for r in steady)
    actors = delta(actor_pids)
    parts = {
        "local training (train_local)": training,
        "ClientApp outside training": app - training,
        "actors outside the ClientApp": actors - app,
        "driver (ServerApp, strategy, engine)": last["driver_cpu"] - first["driver_cpu"],
        "Ray's own processes": delta(None),
    }
    parts["idle"] = capacity - sum(parts.values())
    rows = [[name, f"{value:.1f}", f"{value / capacity:.0%}"] for name, value in parts.items()]
    for name, value in parts.items():
        report.add("efficiency", "fedeq", f"cpu_share:{name}", value / capacity, "ratio")
    table(
        f"CPU budget, rounds 2-{len(res['rounds'])}: {capacity:.1f} CPU-s = wall × {res['cores']} cores",
        ["where", "CPU s", "share"],
        rows,
    )


def section_efficiency(args: argparse.Namespace, report: Report, tmp: Path) -> None:
    res = run_child(
        "efficiency",
        {
            "clients": 100,
            "rounds": args.eff_rounds,
            "out": str(tmp / "efficiency"),
            "overrides": list(args.eff_overrides),
            "pipeline": args.pipeline,
            "share_partitions": not args.no_share_partitions,
        },
        args.child_timeout,
    )
    sizes = res["pool_sizes"]
    actors = sum(sizes.values())
    rows = []

    def summarise(rounds: list[dict[str, Any]], label: str) -> None:
        grid = sum(r["grid_wall_s"] for r in rounds)
        wall = sum(r["round_wall_s"] for r in rounds)
        compute = sum(sum(r["compute_s"].values()) for r in rounds)
        busy = sum(sum(r["busy_s"].values()) for r in rounds)
        cpu = sum(sum(r["cpu_s"].values()) for r in rounds)
        train_cpu = sum(sum(r["compute_cpu_s"].values()) for r in rounds)
        cores = res["cores"]
        slow_busy = sum(max(r["busy_s"][t] / sizes[t] for t in sizes) for r in rounds)
        slow_compute = sum(max(r["compute_s"][t] / sizes[t] for t in sizes) for r in rounds)
        values = {
            "compute_over_grid": compute / (grid * actors),
            "compute_over_round": compute / (wall * actors),
            "busy_over_grid": busy / (grid * actors),
            "slowest_pool_busy_over_grid": slow_busy / grid,
            "slowest_pool_compute_over_grid": slow_compute / grid,
            "actor_cpu_over_grid_cores": cpu / (grid * cores),
            "train_cpu_over_grid_cores": train_cpu / (grid * cores),
            "train_cpu_over_round_cores": train_cpu / (wall * cores),
        }
        for metric, value in values.items():
            report.add("efficiency", "fedeq", metric, value, "ratio", label)
        report.add("efficiency", "fedeq", "grid_wall_per_round", grid / len(rounds), "s", label)
        rows.append(
            [
                label,
                f"{grid / len(rounds):.2f} / {wall / len(rounds):.2f}",
                f"{compute:.1f} / {busy:.1f}",
                f"{values['compute_over_grid']:.0%} / {values['compute_over_round']:.0%}",
                f"{values['busy_over_grid']:.0%}",
                f"{values['slowest_pool_busy_over_grid']:.0%}",
                f"{values['slowest_pool_compute_over_grid']:.0%}",
                f"{values['actor_cpu_over_grid_cores']:.0%}",
                f"{values['train_cpu_over_grid_cores']:.0%} / {values['train_cpu_over_round_cores']:.0%}",
            ]
        )

    summarise(res["rounds"][1:], f"rounds 2-{len(res['rounds'])}")
    summarise(res["rounds"], f"all {len(res['rounds'])} rounds")
    table(
        f"Efficiency, default workload at 100 clients/round, {actors} actors "
        f"({', '.join(f'{t} {n}' for t, n in sizes.items())}); {args.eff_rounds} rounds",
        [
            "",
            "wall/round s: grid / whole",
            "Σ compute / Σ app busy, s",
            "compute/(wall·actors): grid / whole",
            "app busy/(grid·actors)",
            "slowest pool busy/grid",
            "slowest pool compute/grid",
            f"actor CPU/(grid·{res['cores']} cores)",
            f"training CPU/(wall·{res['cores']} cores): grid / whole",
        ],
        rows,
    )
    cpu_budget(res, report)
    per_tier = []
    steady = res["rounds"][1:]
    grid = sum(r["grid_wall_s"] for r in steady)
    for t in sizes:
        comp = sum(r["compute_s"][t] for r in steady)
        comp_cpu = sum(r["compute_cpu_s"][t] for r in steady)
        busy = sum(r["busy_s"][t] for r in steady)
        app_cpu = sum(r["cpu_s"][t] for r in steady)
        per_tier.append(
            [
                t,
                str(sizes[t]),
                f"{comp:.1f} / {comp_cpu:.1f}",
                f"{busy:.1f} / {app_cpu:.1f}",
                f"{busy / (grid * sizes[t]):.0%}",
                f"{app_cpu / (grid * sizes[t]):.0%}",
            ]
        )
        report.add("efficiency", "fedeq", f"pool_busy_fraction:{t}", busy / (grid * sizes[t]), "ratio")
    table(
        "Per pool, rounds 2.. (busy = time inside the ClientApp, measured in the actor)",
        [
            "tier",
            "actors",
            "Σ compute s: wall / CPU",
            "Σ busy s: wall / CPU",
            "busy/(grid·actors)",
            "CPU/(grid·actors)",
        ],
        per_tier,
    )
