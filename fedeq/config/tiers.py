"""Device tiers: each tier's solver budget, backward mode and simulated hardware."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, StrictStr, field_validator, model_validator

from fedeq.config.rules import Float, Int, Section, check_range, problem, range_text, registered_name
from fedeq.registry import BACKWARDS, SOLVERS

__all__ = [
    "SHARE_TOLERANCE",
    "DeadlinePolicy",
    "DevicesConfig",
    "TierConfig",
    "check_client_ids",
    "default_tiers",
    "required_solver",
]

#: Allowed deviation of the sum of tier shares from 1.
SHARE_TOLERANCE = 1e-6
#: Ray's own resource names, which a tier asks for through num_cpus, num_gpus and memory_mb.
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
#: The smallest amount of a Ray resource (Ray counts resources in units of 0.0001).
_MIN_RESOURCE = 1e-4

DeadlinePolicy = Literal["drop", "partial"]
SolverName = registered_name(SOLVERS)
BackwardName = registered_name(BACKWARDS)


def required_solver(backward: str) -> str | None:
    """The solver a registered backward mode needs (its ``requires_solver``), ``None`` if any will do."""
    return getattr(BACKWARDS.get(backward), "requires_solver", None)


class TierConfig(Section):
    """One device tier: solver budget, backward mode and simulated hardware.

    ``share`` is the fraction of clients in the tier; it is ignored (and may stay 0) when ``ids``
    lists the tier's client ids explicitly.
    """

    name: str
    """The tier's name (in ``clients.csv`` and the node config)."""
    share: Float = 0.0
    """In (0, 1] for a tier without ``ids``, in [0, 1] (and unused) for one with them."""
    ids: list[Int] | None = None
    """Client ids of the tier, each in 0..num_clients-1 and in at most one tier."""
    solver: SolverName = "anderson"
    """Forward fixed-point solver: a registered name (``fixed_point``, ``anderson``, ``broyden``)."""
    f_max_iter: Int = Field(ge=1)
    """Forward budget: function evaluations per solve."""
    b_max_iter: Int = Field(ge=1)
    """Backward budget: iterations of the backward mode."""
    backward: BackwardName = "ift"
    """Backward mode: a registered name (``ift``, ``phantom``, ``jfb``, ``broyden_reuse``)."""
    speed: Float = Field(1.0, gt=0)
    """Relative compute speed of the device (1.0: the reference; simulated time only)."""
    bandwidth_up_mbps: Float = Field(10.0, gt=0)
    """Upload bandwidth in Mbit/s (simulated time only)."""
    bandwidth_down_mbps: Float = Field(50.0, gt=0)
    """Download bandwidth in Mbit/s (simulated time only)."""
    latency_s: Float = Field(0.05, ge=0)
    """One-way network latency in seconds (simulated time only)."""
    availability: Float = Field(1.0, gt=0, le=1)
    """Probability that a sampled client of the tier is online in a round."""
    num_cpus: Float = Field(1.0, gt=0)
    """Ray CPUs of each actor of the tier's pool (also its torch threads)."""
    num_gpus: Float = Field(0.0, ge=0)
    """Ray GPU share of each actor of the tier's pool (0.25: four actors per GPU)."""
    memory_mb: Float | None = Field(None, gt=0)
    """Ray memory reservation of each actor in MiB (null: none)."""
    resources: dict[StrictStr, Float] = Field(default_factory=dict)
    """Ray custom resources each actor of the tier asks for, e.g. ``{node_b: 0.01}``: pins the tier's pool
    to the nodes started with that resource (``ray start --resources``)."""

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, name: str) -> str:
        if not name:
            raise problem("tier name must not be empty", "a non-empty unique string")
        return name

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if not name or name in _RAY_RESOURCES:
                raise problem(
                    "not a custom resource name",
                    "a non-empty name other than CPU, GPU, memory and object_store_memory "
                    "(those are num_cpus, num_gpus and memory_mb)",
                    got=name,
                )
            check_range(amount, _MIN_RESOURCE, at=(name,))
        return resources

    @model_validator(mode="after")
    def _share_and_backward(self) -> TierConfig:
        check_range(self.share, 0.0, 1.0, low_open=self.ids is None, at=("share",))
        required = required_solver(self.backward)
        if required is not None and self.solver != required:
            fits = [b for b in BACKWARDS.names() if required_solver(b) in (None, self.solver)]
            raise problem(
                f"{self.backward} requires solver {required} (solver is {self.solver})",
                f"{' | '.join(fits)} with this solver, or set solver={required}",
                at=("backward",),
                got=self.backward,
            )
        return self


def _tier(name: str, solver: str, f: int, b: int, backward: str, **hardware: float) -> TierConfig:
    # built without validation (no registry lookup); every loaded config is validated as a whole
    return TierConfig.model_construct(
        name=name, share=0.25, solver=solver, f_max_iter=f, b_max_iter=b, backward=backward, **hardware
    )


def default_tiers() -> list[TierConfig]:
    """Four equal tiers with forward budgets 2, 6, 12 and 30."""
    return [
        _tier("micro", "fixed_point", 2, 2, "jfb", speed=0.25, bandwidth_up_mbps=1.0,
              bandwidth_down_mbps=5.0, latency_s=0.2, availability=0.8),
        _tier("phone", "anderson", 6, 4, "phantom", speed=0.5, bandwidth_up_mbps=5.0,
              bandwidth_down_mbps=20.0, latency_s=0.1, availability=0.9),
        _tier("laptop", "anderson", 12, 8, "ift", speed=1.0, bandwidth_up_mbps=20.0,
              bandwidth_down_mbps=100.0, latency_s=0.05, availability=0.95),
        _tier("workstation", "broyden", 30, 20, "ift", speed=4.0, bandwidth_up_mbps=100.0,
              bandwidth_down_mbps=500.0, latency_s=0.02, availability=1.0),
    ]  # fmt: skip


class DevicesConfig(Section):
    """Device tiers and the optional simulated round deadline (seconds)."""

    tiers: list[TierConfig] = Field(default_factory=default_tiers)
    """Device tiers: share of the clients, solver budgets, backward mode, simulated hardware."""
    deadline_s: Float | None = Field(None, gt=0)
    """Simulated round deadline in seconds (null: none); see ``deadline_policy``."""
    deadline_policy: DeadlinePolicy = "drop"
    """``drop``: replies past the deadline are discarded; ``partial``: clients stop training when their
    simulated time reaches the deadline and their partial work is aggregated."""
    nfe_cost_s: Float = Field(1e-4, gt=0)
    """Simulated seconds one function evaluation costs per sample on a tier of speed 1.0."""

    @field_validator("tiers")
    @classmethod
    def _at_least_one(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        if not tiers:
            raise problem("at least one tier is required", "a non-empty list of tiers", got=[])
        return tiers

    @model_validator(mode="after")
    def _names_and_shares(self) -> DevicesConfig:
        seen: dict[str, int] = {}
        for i, tier in enumerate(self.tiers):
            if tier.name in seen:
                raise problem(
                    f"duplicate tier name (also used by devices.tiers[{seen[tier.name]}])",
                    "unique tier names",
                    at=("tiers", i, "name"),
                    got=tier.name,
                )
            seen[tier.name] = i
        shares = [t.share for t in self.tiers if t.ids is None]
        total = math.fsum(shares)
        if shares and abs(total - 1.0) > SHARE_TOLERANCE:
            raise problem(
                f"tier shares must sum to 1 (sum is {total:g})",
                f"shares of tiers without ids summing to 1 within {SHARE_TOLERANCE:g}",
                at=("tiers",),
                got=shares,
            )
        return self


def check_client_ids(tiers: Sequence[TierConfig], num_clients: int, at: tuple[str, ...]) -> None:
    """Explicit ids lie in ``0..num_clients-1``, belong to one tier, and cover every client when no
    tier has a share; ``at`` is the location of the tier list."""
    owner: dict[int, int] = {}
    for i, tier in enumerate(tiers):
        for j, cid in enumerate(tier.ids or ()):
            key: tuple[Any, ...] = (*at, i, "ids", j)
            if not 0 <= cid <= num_clients - 1:
                raise problem("out of range", range_text(0, num_clients - 1, integer=True), at=key, got=cid)
            if cid in owner:
                raise problem(
                    f"client id already assigned to devices.tiers[{owner[cid]}]",
                    "each client id in at most one tier",
                    at=key,
                    got=cid,
                )
            owner[cid] = i
    if all(t.ids is not None for t in tiers) and len(owner) < num_clients:
        raise problem(
            "some clients belong to no tier",
            "explicit ids covering every client id, or a tier with a share",
            at=at,
            got=[c for c in range(num_clients) if c not in owner],
        )
