"""fedeq's heterogeneous device engine: a ``flwr.serverapp.Grid`` backed by Ray actor pools.

Each device tier gets its own pool of long-lived Ray actors with the tier's resource request
(``num_cpus``, ``num_gpus`` share, ``memory``), so a GPU tier and CPU tiers run side by side and a tier's
clients never take another tier's resources. An actor loads the ClientApp once and keeps what the app caches
(datasets, partitions, model objects) across calls, so the cost of a call is the client's own work.

Messages go to the pool of their node's tier; replies come back in the order of the messages sent, so
aggregation is deterministic. A call that runs past ``call_timeout_s`` wall-clock seconds is answered with an
error reply and its actor is killed and replaced; a crashed actor is replaced too.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import ray
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

NODE_ID_OFFSET = 1_000_000
"""Node ids are ``NODE_ID_OFFSET + partition id``: stable across runs, so a resumed run samples alike."""


@ray.remote
class ClientWorker:
    """A long-lived process that runs the ClientApp for any node of its tier."""

    def __init__(self, app_ref: str, num_threads: int) -> None:
        import importlib

        import torch

        torch.set_num_threads(max(1, num_threads))
        module, _, attr = app_ref.partition(":")
        self.app = getattr(importlib.import_module(module), attr)
        self.states: dict[int, RecordDict] = {}

    def ready(self) -> bool:
        return True

    def handle(
        self, message: Message, node_id: int, node_config: dict, run_id: int, run_config: dict
    ) -> Message:
        state = self.states.setdefault(node_id, RecordDict())
        context = Context(
            run_id=run_id, node_id=node_id, node_config=node_config, state=state, run_config=run_config
        )
        try:
            return self.app(message, context)
        except Exception as err:  # noqa: BLE001 - a client failure becomes an error reply
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=message
            )


@dataclass
class _Call:
    message: Message
    pool: _TierPool
    actor: Any = None
    ref: Any = None
    ready_ref: Any = None
    """For a fresh actor: resolves when it has started; the call's time limit counts from then."""
    started: float | None = None


@dataclass
class _TierPool:
    name: str
    options: dict[str, Any]
    size: int
    num_threads: int
    actors: list[Any] = field(default_factory=list)
    warm: set = field(default_factory=set)
    idle: deque = field(default_factory=deque)
    queue: deque = field(default_factory=deque)
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


class RayGrid(Grid):
    """A Grid whose nodes are simulated devices served by per-tier Ray actor pools.

    Args:
        tiers: tier configs (name, num_cpus, num_gpus, memory_mb).
        node_tiers: tier index of each partition (node ``i`` is partition ``i``).
        run_config: the run config every ClientApp context receives.
        app_ref: ``"module:attribute"`` of the ClientApp.
        call_timeout_s: wall-clock limit of one client call (``None``: no limit).
        actors_per_tier: pool size of every tier (default: derived from the cluster's CPUs).
        sizes: explicit pool size per tier (overrides ``actors_per_tier``).
    """

    def __init__(
        self,
        tiers: Sequence[Any],
        node_tiers: Sequence[int],
        run_config: dict[str, Any] | None = None,
        app_ref: str = "clients.client_app:app",
        call_timeout_s: float | None = None,
        actors_per_tier: int | None = None,
        sizes: Sequence[int] | None = None,
        run_id: int = 1,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayGrid needs a running Ray: call fedeq.ray_grid.start_ray() first")
        self.tiers = list(tiers)
        self.node_tiers = list(node_tiers)
        self.num_nodes = len(self.node_tiers)
        self.run_config = dict(run_config or {})
        self.app_ref = app_ref
        self.call_timeout_s = call_timeout_s
        self._run = Run.create_empty(run_id)
        if sizes is None:
            total_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            sizes = pool_sizes(self.tiers, total_cpus, actors_per_tier)
        self.pools = []
        for tier, size in zip(self.tiers, sizes, strict=True):
            options: dict[str, Any] = {"num_cpus": float(tier.num_cpus), "num_gpus": float(tier.num_gpus)}
            memory_mb = getattr(tier, "memory_mb", None)
            if memory_mb:
                options["memory"] = int(memory_mb * 2**20)
            self.pools.append(_TierPool(tier.name, options, size, max(1, int(math.ceil(tier.num_cpus)))))
        self.pending: dict[str, _Call] = {}
        self.done: dict[str, Message] = {}
        self.calls = 0

    # ------------------------------------------------------------------ Grid interface

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [NODE_ID_OFFSET + i for i in range(self.num_nodes)]

    def node_config(self, node_id: int) -> dict[str, Any]:
        """The node config a node's ClientApp sees: partition id, number of partitions, tier name."""
        pid = self.partition_of(node_id)
        return {
            "partition-id": pid,
            "num-partitions": self.num_nodes,
            "tier": self.tiers[self.node_tiers[pid]].name,
        }

    def partition_of(self, node_id: int) -> int:
        pid = int(node_id) - NODE_ID_OFFSET
        if not 0 <= pid < self.num_nodes:
            raise ValueError(f"unknown node id {node_id}")
        return pid

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            pool = self.pools[self.node_tiers[self.partition_of(msg.metadata.dst_node_id)]]
            call = _Call(msg, pool)
            self.pending[msg.metadata.message_id] = call
            pool.queue.append(call)
            ids.append(msg.metadata.message_id)
        self._dispatch()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self._progress(0.0)
        return [self.done.pop(mid) for mid in message_ids if mid in self.done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(mid in self.pending for mid in ids):
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            self._progress(wait)
            if deadline is not None and time.monotonic() >= deadline:
                break
        for mid in ids:  # replies that did not arrive in time are abandoned
            call = self.pending.pop(mid, None)
            if call is not None and call.ref is not None:
                self._replace(call)
        return [self.done.pop(mid) for mid in ids if mid in self.done]

    # ------------------------------------------------------------------ pools

    def _new_actor(self, pool: _TierPool) -> Any:
        return ClientWorker.options(**pool.options).remote(self.app_ref, pool.num_threads)

    def _dispatch(self) -> None:
        for pool in self.pools:
            while pool.queue and (pool.idle or len(pool.actors) < pool.size):
                if not pool.idle:
                    actor = self._new_actor(pool)
                    pool.actors.append(actor)
                    pool.idle.append(actor)
                call = pool.queue.popleft()
                call.actor = pool.idle.popleft()
                node = int(call.message.metadata.dst_node_id)
                if call.actor in pool.warm:
                    call.started = time.monotonic()
                else:  # actor calls run in order: `ready` returns when the actor can take the call
                    call.ready_ref = call.actor.ready.remote()
                call.ref = call.actor.handle.remote(
                    call.message, node, self.node_config(node), self._run.run_id, self.run_config
                )
                self.calls += 1

    def _progress(self, wait_s: float) -> None:
        """Collect finished calls (waiting up to ``wait_s``), enforce the per-call limit, refill pools."""
        running = {c.ref: c for c in self.pending.values() if c.ref is not None}
        starting = {c.ready_ref: c for c in running.values() if c.ready_ref is not None}
        if starting:
            up, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in up:
                call = starting.pop(ref)
                call.ready_ref, call.started = None, time.monotonic()
                call.pool.warm.add(call.actor)
        if running:
            timeout = wait_s
            timed = [c.started for c in running.values() if c.started is not None]
            if self.call_timeout_s is not None and timed:
                first_expiry = min(timed) + self.call_timeout_s
                timeout = max(0.0, min(wait_s, first_expiry - time.monotonic()))
            if starting:
                timeout = min(timeout, 0.05)
            refs = list(running)
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:  # take every call that has finished by now, not just the first
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                call = running[ref]
                try:
                    reply = ray.get(ref)
                    call.pool.idle.append(call.actor)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                    reply = Message(
                        Error(ErrorCode.CLIENT_APP_CRASHED, f"actor died: {err}"), reply_to=call.message
                    )
                    self._replace(call, kill=False)
                self._finish(call, reply)
            if self.call_timeout_s is not None:
                now = time.monotonic()
                for ref, call in running.items():
                    if ref in ready or call.started is None:
                        continue
                    if now - call.started > self.call_timeout_s:
                        reason = f"timeout: no reply within call_timeout_s={self.call_timeout_s:g}"
                        self._replace(call)
                        self._finish(
                            call, Message(Error(ErrorCode.CLIENT_APP_CRASHED, reason), reply_to=call.message)
                        )
        self._dispatch()

    def _finish(self, call: _Call, reply: Message) -> None:
        mid = call.message.metadata.message_id
        if self.pending.pop(mid, None) is not None:
            self.done[mid] = reply
        call.ref = None

    def _replace(self, call: _Call, kill: bool = True) -> None:
        """Retire ``call``'s actor (killing it if still alive) and let the pool start a fresh one."""
        pool = call.pool
        if kill:
            ray.kill(call.actor, no_restart=True)
        if call.actor in pool.actors:
            pool.actors.remove(call.actor)
        pool.warm.discard(call.actor)
        pool.replaced += 1
        call.ref = None

    def warm_up(self) -> None:
        """Start every pool's actors now (they import torch and the app), so round 1 is not slower."""
        refs = []
        for pool in self.pools:
            while len(pool.actors) < pool.size:
                actor = self._new_actor(pool)
                pool.actors.append(actor)
                pool.idle.append(actor)
                refs.append((pool, actor, actor.ready.remote()))
        ray.get([ref for _, _, ref in refs])
        for pool, actor, _ in refs:
            pool.warm.add(actor)

    def shutdown(self) -> None:
        for pool in self.pools:
            for actor in pool.actors:
                ray.kill(actor, no_restart=True)
            pool.actors.clear()
            pool.idle.clear()


def start_ray(address: str | None = None, num_cpus: float | None = None, quiet: bool = True) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one (no dashboard).

    Locally the logical CPU count is at least what the tiers' pools ask for, so every pool can hold its
    actors (several per physical core, each with its own thread budget).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": not quiet,
        "configure_logging": False,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
