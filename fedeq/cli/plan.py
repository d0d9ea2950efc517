"""``fedeq simulate --dry-run``: the plan of a validated run, printed instead of running it.

It shows what the run would do and with what: rounds and sampling, the model and its size, the data and
its partition (examples per client, per tier), and the engine's resources (Ray actor pools and CPUs per
tier). Nothing is started and nothing is written.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TierPlan", "engine_plan", "plan_text", "print_plan", "tier_plans"]


@dataclass(frozen=True)
class TierPlan:
    """One device tier of the plan: its clients' data and the resources its clients run on."""

    name: str
    clients: int
    sizes: tuple[int, ...]
    """Training examples of each of the tier's clients (before the local validation split)."""
    budget: str
    resources: str

    def size_summary(self) -> str:
        if not self.sizes:
            return "-"
        low, mid, high = min(self.sizes), statistics.median(self.sizes), max(self.sizes)
        return f"{low} / {mid:g} / {high}"


def _cpu_text(num_cpus: float, num_gpus: float) -> str:
    gpu = f" + {num_gpus:g} GPU" if num_gpus else ""
    return f"{num_cpus:g} CPU{gpu}"


def engine_plan(cfg: Any) -> tuple[str, list[str]]:
    """One line about the engine, and the resources of each tier's clients (one entry per tier)."""
    tiers = list(cfg.devices.tiers)
    cores = os.cpu_count() or 1
    if cfg.engine == "ray":
        from fedeq.engines.ray.pools import plan_grid

        groups, sizes, cpus = plan_grid(cfg)
        where = (
            f"joins the Ray cluster at {cfg.ray.address}"
            if cfg.ray.address
            else (f"a local Ray cluster with {cpus} logical CPUs ({cores} cores)")
        )
        shared = "one per tier" if len(groups) == len(tiers) else "tiers with the same resources share one"
        pools = f"{len(sizes)} pool{'s' if len(sizes) != 1 else ''}"
        line = f"ray: {where}; {sum(sizes)} actors in {pools} ({shared})"
        per_tier = [""] * len(tiers)
        for group, size in zip(groups, sizes, strict=True):
            t = tiers[group[0]]
            threads = max(1, math.ceil(t.num_cpus))
            text = (
                f"{size} actor{'s' if size != 1 else ''} x {_cpu_text(t.num_cpus, t.num_gpus)}, "
                f"{threads} torch thread{'s' if threads > 1 else ''}"
            )
            for i in group:
                others = [tiers[j].name for j in group if j != i]
                per_tier[i] = text + (f", shared with {', '.join(others)}" if others else "")
        return line, per_tier
    if cfg.engine == "flower":
        t0 = tiers[0]
        at_once = max(1, int(cores // max(float(t0.num_cpus), 1e-9)))
        line = (
            f"flower: Flower's simulation engine, {cfg.num_clients} SuperNodes on a local Ray cluster with "
            f"{cores} CPUs; every client gets the first tier's {_cpu_text(t0.num_cpus, t0.num_gpus)} "
            f"(up to {at_once} at a time)"
        )
        return line, [_cpu_text(t0.num_cpus, t0.num_gpus)] * len(tiers)
    return f"{cfg.engine}: no resource plan for this engine", ["-"] * len(tiers)


def cohort_text(cfg: Any, model: Any) -> str:
    """How the Ray engine groups each round's train calls: cohorts of a tier, or one client per call."""
    from fedeq.train import adversarial_from_config
    from fedeq.train.cohort import cohort_problem

    size = cfg.ray.cohort_size
    if size == 1:
        return "off (ray.cohort_size=1): one client per call"
    train = cfg.train
    problem = cohort_problem(
        model,
        jac_reg=train.jac_reg,
        randomize_budget=train.randomize_budget,
        adversarial=adversarial_from_config(train),
    )
    if cfg.personalization.method != "none":
        problem = f"personalised training (personalization.method={cfg.personalization.method})"
    if problem is not None:
        return f"not vectorized, one client per call: {problem}"
    if size == "auto":
        return "auto: each actor trains its share of a tier's clients in a round together (capped by memory)"
    return f"{size} clients of a tier per call, trained together"


def tier_plans(cfg: Any, sizes: list[int], resources: list[str]) -> list[TierPlan]:
    """The plan of every tier from the partition ``sizes`` (one per client) and ``resources`` per tier."""
    from fedeq.devices.assign import assign_tiers

    assignment = assign_tiers(cfg)
    plans = []
    for i, t in enumerate(cfg.devices.tiers):
        mine = tuple(size for size, tier in zip(sizes, assignment, strict=True) if tier == i)
        budget = f"{t.solver} {t.f_max_iter}/{t.b_max_iter} {t.backward}, availability {t.availability:g}"
        plans.append(TierPlan(t.name, len(mine), mine, budget, resources[i]))
    return plans


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    cells = [(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return ["  " + "  ".join(row).rstrip() for row in cells]


def plan_text(cfg: Any, out: Path | None = None) -> str:
    """The plan of ``cfg`` (a validated config) as text; ``out`` is the folder the run would write."""
    from fedeq.arrays import record_from_state_dict
    from fedeq.data import client_dataset, partition_sizes
    from fedeq.models import build_model, num_parameters
    from fedeq.server.app import evaluate_fraction, shared_arrays

    splits = client_dataset(cfg.data, cfg.seed)
    sizes = partition_sizes(cfg.data, cfg.num_clients, cfg.seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    shared = shared_arrays(cfg, model).count_bytes()
    whole = record_from_state_dict(model.state_dict()).count_bytes()
    evaluate = evaluate_fraction(cfg)
    engine_line, resources = engine_plan(cfg)
    lines = [
        "dry run: the config is valid; nothing was started or written",
        f"rounds    {cfg.rounds}, {cfg.clients_per_round} of {cfg.num_clients} clients per round, "
        f"strategy {cfg.strategy.name}, federated evaluation "
        + (f"on {evaluate:.0%} of the clients" if evaluate > 0 else "off"),
        f"model     {cfg.model.name}: {num_parameters(model):,} parameters ({nbytes:,} bytes per transfer)",
        f"data      {cfg.data.name}: {len(splits.y_train):,} training / {len(splits.y_test):,} test "
        f"examples, input {tuple(splits.input_shape)}, {splits.num_classes} classes",
        f"partition {cfg.data.partition}: {min(sizes)} / {statistics.median(sizes):g} / {max(sizes)} "
        "training examples per client (min / median / max)",
        f"engine    {engine_line}",
    ]
    if cfg.personalization.method != "none":
        method = cfg.personalization.method
        lines.append(
            f"personal  {method}: {shared:,} of the {whole:,} bytes travel each way, the rest stays on the "
            f"devices; every client is evaluated on its own test split ({cfg.data.client_test_fraction:g})"
        )
    if cfg.engine == "ray":
        lines.append(f"cohorts   {cohort_text(cfg, model)}")
    if out is not None:
        lines.append(f"output    {out}")
    rows = [["tier", "clients", "examples min / median / max", "solver f/b backward", "runs on"]]
    for plan in tier_plans(cfg, sizes, resources):
        rows.append([plan.name, str(plan.clients), plan.size_summary(), plan.budget, plan.resources])
    return "\n".join([*lines, "tiers", *_table(rows)]) + "\n"


def print_plan(cfg: Any, out: Path | None = None) -> None:
    """Print :func:`plan_text` to standard output."""
    print(plan_text(cfg, out), end="")
