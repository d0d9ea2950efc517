"""Per-tier actor pools of the Ray grid: their sizes, their state, and the calls they run."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

__all__ = ["Call", "TierPool", "pool_sizes"]


@dataclass(eq=False)
class Call:
    """One message on its way through a tier's pool, and the actor call that answers it."""

    message: Message
    pool: TierPool
    actor: Any = None
    ref: Any = None
    ready_ref: Any = None
    """For a fresh actor: resolves when it has started; the call's time limit counts from then."""
    started: float | None = None
    """When the call began to run; ``None`` while it waits for its actor or for the call ahead of it."""

    @property
    def mid(self) -> str:
        return self.message.metadata.message_id


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
            share = float(t.share) if t.share else 1.0 / len(tiers)
            sizes.append(max(1, int(total_cpus * share // max(t.num_cpus, 1e-9))))
    return sizes
