"""Starting, preparing and stopping the actors of the Ray grid's pools (a mixin of :class:`RayGrid`)."""

from __future__ import annotations

from typing import Any

import ray

from fedeq.engines.ray.pools import TierPool, placeable_options
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
        """Wait until every started actor has loaded the app and run its setup."""
        starting = [(pool, a) for pool in self.pools for a in pool.actors if a not in pool.warm]
        ray.get([actor.ready.remote() for _, actor in starting])
        for pool, actor in starting:
            pool.warm.add(actor)

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
