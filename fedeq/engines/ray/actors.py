"""Starting, preparing and stopping the actors of the Ray grid's pools (a mixin of :class:`RayGrid`)."""

from __future__ import annotations

from collections import deque
from typing import Any

import ray

from fedeq.engines.ray.pools import TierPool, placeable_options, unplaceable
from fedeq.engines.ray.worker import ClientWorker

__all__ = ["PoolActors"]


class PoolActors:
    """The actor side of :class:`~fedeq.engines.ray.grid.RayGrid`: it reads the grid's ``pools``,
    ``app_ref``, ``run_config``, ``cohort_ref`` and the setup reference ``_setup``."""

    pools: list[TierPool]
    app_ref: str
    run_config: dict[str, Any]
    cohort_ref: str | None
    _setup: Any

    def set_actor_setup(self, function: Any, args: tuple) -> None:
        """Have every actor, running or started later, call ``function(*args)`` before its next call.

        Both must be picklable; ``args`` go through Ray's object store once, however many actors there are.
        Use it to hand the actors data the driver prepared (e.g. the partitions), so that they need not
        compute it themselves. An actor whose setup raises goes on serving calls.
        """
        self._setup = ray.put((function, tuple(args)))
        for pool in self.pools:
            for actor in pool.actors:
                actor.setup.remote(self._setup)

    def _new_actor(self, pool: TierPool) -> Any:
        options = placeable_options(pool)
        actor = ClientWorker.options(**options).remote(
            self.app_ref, pool.num_threads, self.run_config, self.cohort_ref
        )
        if self._setup is not None:
            actor.setup.remote(self._setup)
        if options.get("resources"):
            pool.asked[actor] = dict(options["resources"])
        return actor

    def warm_up(self, wait: bool = True) -> None:
        """Start every pool's actors now (they import torch and the app), so round 1 is not slower.

        With ``wait=False`` the actors start in the background while the driver goes on (call
        :meth:`wait_ready` later); a call sent to an actor that is still starting waits for it, and its time
        limit counts from when the actor is up.
        """
        for pool in self.pools:
            while len(pool.actors) < pool.size:
                actor = self._new_actor(pool)
                pool.actors.append(actor)
                pool.idle.append(actor)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every started actor has loaded the app and run its setup; an actor's start-up error is
        raised here. An idle actor that asked for a custom resource whose node has died meanwhile would wait
        forever: it is replaced by one without that resource (checked once a second, as in the rounds)."""
        starting = {a.ready.remote(): (p, a) for p in self.pools for a in p.actors if a not in p.warm}
        while starting:
            up, _ = ray.wait(list(starting), num_returns=len(starting), timeout=1.0)
            ray.get(up)
            for ref in up:
                pool, actor = starting.pop(ref)
                pool.warm.add(actor)
            waiting = [(ref, p, a) for ref, (p, a) in starting.items() if a in p.asked and not p.lines.get(a)]
            cluster = ray.cluster_resources() if waiting else {}
            for ref, pool, actor in waiting:
                if unplaceable(pool, actor, cluster):
                    del starting[ref]
                    fresh = self._swap_idle_actor(pool, actor)
                    starting[fresh.ready.remote()] = (pool, fresh)

    def _swap_idle_actor(self, pool: TierPool, actor: Any) -> Any:
        """Kill ``actor`` (idle, no calls sent) and put a new actor of ``pool`` in its place."""
        ray.kill(actor, no_restart=True)
        fresh = self._new_actor(pool)
        pool.actors[pool.actors.index(actor)] = fresh
        pool.idle = deque(fresh if a is actor else a for a in pool.idle)
        pool.asked.pop(actor, None)
        pool.replaced += 1
        return fresh

    def actor_stats(self) -> list[dict[str, Any]]:
        """:meth:`ClientWorker.stats` of every live actor, with its tier (waits for running calls)."""
        names = [(pool.name, actor) for pool in self.pools for actor in pool.actors]
        stats = ray.get([actor.stats.remote() for _, actor in names])
        return [{"tier": name, **st} for (name, _), st in zip(names, stats, strict=True)]

    def shutdown(self) -> None:
        for pool in self.pools:
            for actor in pool.actors:
                ray.kill(actor, no_restart=True)
            pool.actors.clear()
            pool.idle.clear()
            pool.lines.clear()
            pool.asked.clear()
