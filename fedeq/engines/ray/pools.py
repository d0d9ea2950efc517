"""Per-tier actor pools of the Ray grid: their sizes, their state, and the calls they run."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Message

__all__ = [
    "Call",
    "TierPool",
    "actor_options",
    "placeable_options",
    "unplaceable",
    "cpus_needed",
    "plan_grid",
    "plan_pools",
    "pool_groups",
    "pool_sizes",
]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
    """One message, or a cohort of train messages of one tier, on its way through a tier's pool, and the
    actor call that answers it (one reply per message)."""

    messages: list[Message]
    pool: TierPool
    actor: Any = None
    ref: Any = None
    ready_ref: Any = None
    """For a fresh actor: resolves when it has started; the call's time limit counts from then."""
    started: float | None = None
    """When the call began to run; ``None`` while it waits for its actor or for the call ahead of it."""

    @property
    def message(self) -> Message:
        return self.messages[0]

    @property
    def mid(self) -> str:
        return self.message.metadata.message_id

    @property
    def mids(self) -> list[str]:
        return [m.metadata.message_id for m in self.messages]


@dataclass
class TierPool:
    """The actors of one tier (started with ``options``), the calls they hold and the calls waiting."""

    name: str
    options: dict[str, Any]
    size: int
    num_threads: int
    actors: list[Any] = field(default_factory=list)
    warm: set = field(default_factory=set)
    idle: deque = field(default_factory=deque)
    queue: deque = field(default_factory=deque)
    lines: dict[Any, deque] = field(default_factory=dict)
    """The calls sent to each actor, in the order it runs them (the first one is running)."""
    asked: dict[Any, dict[str, float]] = field(default_factory=dict)
    """The custom resources each actor that asked for some was started with."""
    replaced: int = 0


def pool_sizes(tiers: Sequence[Any], total_cpus: float, actors_per_tier: int | None = None) -> list[int]:
    """Actors per tier: ``actors_per_tier`` when given; else a GPU tier gets ``1 / num_gpus`` actors
    (its clients share the GPU) and a CPU tier its share of ``total_cpus`` at ``num_cpus`` per actor, >= 1."""
    sizes = []
    for t in tiers:
        if actors_per_tier is not None:
            sizes.append(int(actors_per_tier))
        elif t.num_gpus > 0:
            sizes.append(max(1, int(round(1.0 / t.num_gpus))))
        else:
            sizes.append(cpu_pool_size(total_cpus, tier_share(t, len(tiers)), t.num_cpus))
    return sizes


def tier_share(tier: Any, num_tiers: int) -> float:
    """The tier's share of the clients (an even split when it has none: a tier given by ``ids``)."""
    return float(tier.share) if tier.share else 1.0 / num_tiers


def cpu_pool_size(total_cpus: float, share: float, num_cpus: float) -> int:
    """Actors of ``num_cpus`` each in ``share`` of ``total_cpus`` (at least one)."""
    return max(1, int(total_cpus * share // max(float(num_cpus), 1e-9)))


def cpus_needed(tiers: Sequence[Any], sizes: Sequence[int]) -> float:
    """Logical CPUs the tiers' actor pools of ``sizes`` ask for together."""
    return sum(size * float(t.num_cpus) for size, t in zip(sizes, tiers, strict=True))


def plan_pools(cfg: Any) -> tuple[list[int], int]:
    """Pool size of every tier and the logical CPUs a local cluster needs to hold them all (a whole
    number, as Ray requires, even when tiers ask for fractions of a CPU)."""
    cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1)
    sizes = pool_sizes(cfg.devices.tiers, cpus, cfg.ray.actors_per_tier)
    return sizes, math.ceil(max(cpus, cpus_needed(cfg.devices.tiers, sizes)) - 1e-9)


def pool_groups(
    tiers: Sequence[Any], total_cpus: float, actors_per_tier: int | None = None, share: bool = True
) -> tuple[list[list[int]], list[int]]:
    """The actor pools: the tiers each one serves and its size.

    One pool per tier (:func:`pool_sizes`), unless those pools need more CPUs than ``total_cpus`` (more
    tiers than cores: each tier gets at least one actor). Then the CPU tiers that ask for the same
    resources (``num_cpus``, ``memory_mb``, custom ``resources``) share one pool, sized by their combined
    share, so the machine runs as many actors as it has CPUs for instead of more processes than cores. GPU
    tiers, ``actors_per_tier`` and ``share=False`` keep one pool per tier.
    """
    sizes = pool_sizes(tiers, total_cpus, actors_per_tier)
    singles = [[i] for i in range(len(tiers))]
    if not share or actors_per_tier is not None or cpus_needed(tiers, sizes) <= total_cpus + 1e-9:
        return singles, sizes
    keys: dict[tuple, list[int]] = {}
    for i, t in enumerate(tiers):
        resources = tuple(sorted(custom_resources(t).items()))
        same = ("cpu", float(t.num_cpus), getattr(t, "memory_mb", None), resources)
        if t.num_gpus:
            same = ("tier", i)
        keys.setdefault(same, []).append(i)
    groups = list(keys.values())
    group_sizes = []
    for group in groups:
        if len(group) == 1:
            group_sizes.append(sizes[group[0]])
            continue
        group_share = sum(tier_share(tiers[i], len(tiers)) for i in group)
        group_sizes.append(cpu_pool_size(total_cpus, group_share, tiers[group[0]].num_cpus))
    return groups, group_sizes


def plan_grid(cfg: Any) -> tuple[list[list[int]], list[int], int]:
    """The pools of ``cfg`` (:func:`pool_groups`: tiers and size of each; tiers share pools only on a
    local cluster) and the logical CPUs a local cluster needs to hold them all (a whole number)."""
    tiers = cfg.devices.tiers
    cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1)
    groups, sizes = pool_groups(tiers, cpus, cfg.ray.actors_per_tier, share=not cfg.ray.address)
    need = cpus_needed([tiers[group[0]] for group in groups], sizes)
    return groups, sizes, math.ceil(max(cpus, need) - 1e-9)


def actor_options(tier: Any) -> dict[str, Any]:
    """The Ray resource request of one actor of ``tier``: ``num_cpus``, ``num_gpus``, ``memory`` and the
    tier's custom ``resources``."""
    options: dict[str, Any] = {"num_cpus": float(tier.num_cpus), "num_gpus": float(tier.num_gpus)}
    memory_mb = getattr(tier, "memory_mb", None)
    if memory_mb:
        options["memory"] = int(memory_mb * 2**20)
    resources = custom_resources(tier)
    if resources:
        options["resources"] = resources
    return options


def custom_resources(tier: Any) -> dict[str, float]:
    """The Ray custom resources each actor of ``tier`` asks for (``devices.tiers[i].resources``)."""
    return {str(name): float(amount) for name, amount in (getattr(tier, "resources", None) or {}).items()}


def placeable_options(pool: TierPool) -> dict[str, Any]:
    """The options a new actor of ``pool`` starts with.

    A custom resource that the live nodes of the cluster no longer have (enough of), e.g. because the
    nodes started with it died, is dropped from the pool's options for the rest of the run, with one warning:
    its actors then start on the surviving nodes instead of waiting for the resource forever. Ray is only
    asked when the pool has custom resources.
    """
    wanted = pool.options.get("resources")
    if wanted:
        import ray

        gone = vanished_resources(wanted, ray.cluster_resources())
        if gone:
            kept = {name: amount for name, amount in wanted.items() if name not in gone}
            if kept:
                pool.options["resources"] = kept
            else:
                del pool.options["resources"]
            logger.warning(
                "fedeq: warning: pool %s: Ray custom resource %s is gone from the cluster (its nodes died or "
                "were never started); starting the pool's actors on the other nodes",
                pool.name,
                ", ".join(f"{name}={wanted[name]:g}" for name in gone),
            )
    return dict(pool.options)


def vanished_resources(wanted: dict[str, float], cluster: dict[str, float]) -> list[str]:
    """The names in ``wanted`` whose amount exceeds the cluster's total ``cluster`` of that resource."""
    return [name for name, amount in wanted.items() if float(cluster.get(name, 0.0)) < amount - 1e-9]


def unplaceable(pool: TierPool, actor: Any, cluster: dict[str, float]) -> bool:
    """Whether ``actor`` of ``pool`` asked for a custom resource that the cluster (``cluster``: its total
    resources) no longer has: its node died while the actor was being placed, so it would wait forever."""
    return bool(vanished_resources(pool.asked.get(actor) or {}, cluster))
