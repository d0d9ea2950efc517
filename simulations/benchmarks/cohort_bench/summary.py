"""From a child's measurements to the numbers of the report: per engine, ratios, the final line."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine_bench.report import median, table

MIB = 2.0**20


@dataclass
class EngineNumbers:
    """One engine's run, rounds after the first (the warm-up)."""

    label: str
    rounds: int
    median_round_s: float
    updates_per_s: float
    training_share: float
    """Σ ``compute_cpu_s`` (rounds 2..) / CPU used by the driver and every process below it (same window)."""
    machine_share: float
    """Σ ``compute_cpu_s`` (rounds 2..) / (wall × cores) of the same window."""
    actor_share: float
    """Σ ``compute_cpu_s`` (rounds 2..) / CPU of the processes that run the clients (the actors) only."""
    calls_per_round: float
    largest_call: int
    actors: int
    actor_peak_mib: float
    actors_peak_mib: float
    all_peak_mib: float
    peak_pss_mib: float | None
    run_s: float

    @property
    def rounds_per_min(self) -> float:
        return 60.0 / self.median_round_s if self.median_round_s > 0 else float("nan")


def numbers(label: str, res: dict[str, Any]) -> EngineNumbers:
    """:class:`EngineNumbers` of a :func:`cohort_bench.child.child_run` result."""
    walls, oks, train = res["round_wall_s"], res["clients_ok"], res["train_cpu_s"]
    steady = slice(1, None) if len(walls) > 1 else slice(0, None)
    cpu = res["cpu"]
    used = cpu["driver_cpu_s"] + cpu["children_cpu_s"]
    training = sum(train[steady])
    cohorts = [c for c in res["cohorts"] if c["round"] > 1] or res["cohorts"]
    peaks = res["actor_peak_rss"] or [0]
    pss = res.get("peak_pss")
    return EngineNumbers(
        label=label,
        rounds=len(walls),
        median_round_s=median(walls[steady]),
        updates_per_s=sum(oks[steady]) / max(1e-9, sum(walls[steady])),
        training_share=training / used if used > 0 else float("nan"),
        machine_share=training / (cpu["wall_s"] * res["cores"]) if cpu["wall_s"] > 0 else float("nan"),
        actor_share=training / cpu["actors_cpu_s"] if cpu.get("actors_cpu_s") else float("nan"),
        calls_per_round=sum(c["calls"] for c in cohorts) / max(1, len(cohorts)),
        largest_call=max((c["largest"] for c in cohorts), default=0),
        actors=len(res["actor_peak_rss"]),
        actor_peak_mib=max(peaks) / MIB,
        actors_peak_mib=sum(peaks) / MIB,
        all_peak_mib=(res["all_peak_rss"] + res["driver_peak_rss"]) / MIB,
        peak_pss_mib=pss / MIB if pss else None,
        run_s=float(res["run_s"]),
    )


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when either is missing or ``b`` is 0."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return float("nan")
    return a / b


def engine_table(title: str, rows: list[EngineNumbers]) -> None:
    """The per-engine table."""
    table(
        title,
        [
            "engine",
            "rounds",
            "median round s",
            "rounds/min",
            "updates/s",
            "training share",
            "train/actor CPU",
            "train/capacity",
            "calls/round (max)",
            "actors x peak MiB / Σ",
            "Σ peak RSS MiB",
            "run s",
        ],
        [
            [
                n.label,
                str(n.rounds),
                f"{n.median_round_s:.3f}",
                f"{n.rounds_per_min:.1f}",
                f"{n.updates_per_s:.1f}",
                f"{n.training_share:.0%}",
                f"{n.actor_share:.0%}",
                f"{n.machine_share:.0%}",
                f"{n.calls_per_round:.1f} ({n.largest_call})",
                f"{n.actors} x {n.actor_peak_mib:.0f} / {n.actors_peak_mib:.0f}",
                f"{n.all_peak_mib:.0f}" + (f" (PSS {n.peak_pss_mib:.0f})" if n.peak_pss_mib else ""),
                f"{n.run_s:.0f}",
            ]
            for n in rows
        ],
    )


def ratio_table(title: str, rows: list[tuple[str, float, str]]) -> None:
    """Ratios against their targets: (what, value, target text)."""
    table(title, ["ratio", "value", "target"], [[what, f"{v:.2f}", target] for what, v, target in rows])


def final_line(vs_per_client: float, vs_flower: float, share: float) -> str:
    """The line a script reads: ``speedup_vs_per_client X.XX speedup_vs_flower Y.YY training_share Z.ZZ``."""
    return (
        f"speedup_vs_per_client {vs_per_client:.2f} speedup_vs_flower {vs_flower:.2f} "
        f"training_share {share:.2f}"
    )
