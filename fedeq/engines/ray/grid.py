"""fedeq's heterogeneous device engine: a ``flwr.serverapp.Grid`` backed by Ray actor pools.

Each device tier gets its own pool of long-lived Ray actors with the tier's resource request
(``num_cpus``, ``num_gpus`` share, ``memory``), so a GPU tier and CPU tiers run side by side and a tier's
clients never take another tier's resources (on a machine with fewer cores than tiers, tiers that ask for
the same resources share one pool: :func:`~fedeq.engines.ray.pools.pool_groups`). An actor loads the
ClientApp once and keeps what the app caches (datasets, partitions, model objects) across calls, so the cost
of a call is the client's own work.

Messages go to the pool of their node's tier; replies come back in the order of the messages sent, so
aggregation is deterministic. While a pool has a backlog, each busy actor also holds its next call, so it
starts it without a round trip through the driver. A call that runs past ``call_timeout_s`` wall-clock
seconds is answered with an error reply and its actor is killed and replaced; a crashed actor is replaced
too; calls queued behind either go back to the pool's queue. Data the driver prepares once (the partitions)
reaches every actor through :meth:`RayGrid.set_actor_setup`.

The actor is :class:`~fedeq.engines.ray.worker.ClientWorker`; pools and their sizes are in
:mod:`fedeq.engines.ray.pools`, starting and stopping their actors in :mod:`fedeq.engines.ray.actors`, and
cohorts (several train messages answered by one call) in :mod:`fedeq.engines.ray.cohorts`.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import ray
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from fedeq.devices.faults import timeout_reply
from fedeq.engines.ray.actors import PoolActors
from fedeq.engines.ray.cluster import start_ray
from fedeq.engines.ray.cohorts import CohortSize, group_calls
from fedeq.engines.ray.node_states import NodeStates
from fedeq.engines.ray.pools import Call, TierPool, actor_options, pool_sizes, unplaceable
from fedeq.engines.ray.worker import ClientWorker
from fedeq.engines.run_grid import RunGrid, assign_message_id

__all__ = ["NODE_ID_OFFSET", "ClientWorker", "RayGrid", "pool_sizes", "start_ray"]

_ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)

NODE_ID_OFFSET = 1_000_000
"""Node ids are ``NODE_ID_OFFSET + partition id``: stable across runs, so a resumed run samples alike."""


class RayGrid(PoolActors, RunGrid):
    """A Grid whose nodes are simulated devices served by per-tier Ray actor pools.

    Args:
        tiers: tier configs (name, num_cpus, num_gpus, memory_mb).
        node_tiers: tier index of each partition (node ``i`` is partition ``i``).
        run_config: the run config every ClientApp context receives.
        app_ref: ``"module:attribute"`` of the ClientApp.
        call_timeout_s: wall-clock limit of one client call (``None``: no limit).
        actors_per_tier: pool size of every tier (default: derived from the cluster's CPUs).
        sizes: explicit pool size per tier (overrides ``actors_per_tier``), or per group with ``groups``.
        groups: the tier indices each pool serves (default: one pool per tier); tiers that share a pool
            must ask for the same resources (see :func:`~fedeq.engines.ray.pools.pool_groups`).
        actor_setup: ``(function, args)`` that every actor runs once before its first call (see
            :meth:`set_actor_setup`).
        cohort_size: ``1`` (one client per call), a number of clients, or ``"auto"``: the train messages of
            one tier in a push are grouped into cohorts of that size, each answered by one call of the
            cohort handler ``cohort_ref`` (:mod:`fedeq.engines.ray.cohorts`); a cohort's time limit is
            ``call_timeout_s`` per client in it.
        cohort_caps: the largest cohort of each tier for ``"auto"`` (default: no cap below 512).
        pipeline: calls sent ahead to a busy actor. With 2 (the default), while a pool has a backlog each
            actor holds its next call in its own queue and starts it the moment the current one ends, with
            no round trip through the driver; near the end of a round calls go only to free actors, so
            the work stays balanced. 1: one call per actor at a time.
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
        groups: Sequence[Sequence[int]] | None = None,
        run_id: int = 1,
        actor_setup: tuple[Any, tuple] | None = None,
        pipeline: int = 2,
        cohort_size: CohortSize = 1,
        cohort_caps: Sequence[int] | None = None,
        cohort_ref: str = "clients.cohort_app:train_cohort_messages",
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayGrid needs a running Ray: call fedeq.engines.ray.grid.start_ray() first")
        super().__init__(run_id)
        self.tiers = list(tiers)
        self.tier_names = [str(t.name) for t in self.tiers]
        self.node_tiers = list(node_tiers)
        self.num_nodes = len(self.node_tiers)
        self.run_config = dict(run_config or {})
        self.app_ref = app_ref
        self.call_timeout_s = call_timeout_s
        self.pipeline = max(1, int(pipeline))
        self.cohort_size = cohort_size
        self.cohort_caps = list(cohort_caps) if cohort_caps is not None else [512] * len(self.tiers)
        self.cohort_ref = cohort_ref if cohort_size != 1 else None
        self._setup: Any = None
        self._next_placement_check = 0.0
        if groups is None:
            groups = [[i] for i in range(len(self.tiers))]
        if sizes is None:
            total_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            sizes = pool_sizes(self.tiers, total_cpus, actors_per_tier)
        self.pools = []
        self.pool_of = [0] * len(self.tiers)
        """Index in :attr:`pools` of each tier's pool."""
        for group, size in zip(groups, sizes, strict=True):
            tier = self.tiers[group[0]]
            options = actor_options(tier)
            name = "+".join(self.tier_names[i] for i in group)
            for i in group:
                self.pool_of[i] = len(self.pools)
            self.pools.append(TierPool(name, options, size, max(1, int(math.ceil(tier.num_cpus)))))
        if actor_setup is not None:
            self.set_actor_setup(*actor_setup)
        self.pending: dict[str, Call] = {}
        self.done: dict[str, Message] = {}
        self.node_states = NodeStates()
        """Each node's ``context.state`` (personal tensors of personalised methods), checkpointed with the
        run: the engine is the devices' storage."""

    # ------------------------------------------------------------------ Grid interface

    def get_node_ids(self) -> list[int]:
        return [NODE_ID_OFFSET + i for i in range(self.num_nodes)]

    def node_config(self, node_id: int) -> dict[str, Any]:
        """The node config a node's ClientApp sees: partition id, number of partitions, tier name."""
        pid = self.partition_of(node_id)
        return {
            "partition-id": pid,
            "num-partitions": self.num_nodes,
            "tier": self.tier_names[self.node_tiers[pid]],
        }

    def partition_of(self, node_id: int) -> int:
        pid = int(node_id) - NODE_ID_OFFSET
        if not 0 <= pid < self.num_nodes:
            raise ValueError(f"unknown node id {node_id}")
        return pid

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = []
        tiers = []
        for msg in messages:
            assign_message_id(msg)
            ids.append(msg.metadata.message_id)
            tiers.append(self.node_tiers[self.partition_of(msg.metadata.dst_node_id)])
        sizes = [pool.size for pool in self.pools]
        costs = [float(getattr(t, "f_max_iter", 1) + getattr(t, "b_max_iter", 0)) for t in self.tiers]
        cohort = self.cohort_size
        for tier, group in group_calls(messages, tiers, cohort, self.pool_of, sizes, self.cohort_caps, costs):
            self._enqueue(group, tier)
        self._dispatch()
        return ids

    def _enqueue(self, messages: list[Message], tier: int) -> None:
        call = Call(messages, self.pools[self.pool_of[tier]])
        for mid in call.mids:
            self.pending[mid] = call
        call.pool.queue.append(call)

    def _wanted(self, call: Call) -> bool:
        """Whether a reply to any message of ``call`` is still awaited."""
        return any(mid in self.pending for mid in call.mids)

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
        # Replies that did not arrive in time are abandoned; an actor still running one is replaced (a call
        # queued behind others runs later and its reply is dropped).
        abandoned = {id(c): c for mid in ids if (c := self.pending.pop(mid, None)) is not None}
        for call in abandoned.values():
            line = call.pool.lines.get(call.actor)
            if call.ref is not None and line and line[0] is call:
                self._replace(call)
        return [self.done.pop(mid) for mid in ids if mid in self.done]

    # ------------------------------------------------------------------ pools

    def _dispatch(self) -> None:
        for pool in self.pools:
            while pool.queue and (pool.idle or len(pool.actors) < pool.size):
                call = pool.queue.popleft()
                if not self._wanted(call):  # abandoned before it was sent
                    continue
                if not pool.idle:
                    actor = self._new_actor(pool)
                    pool.actors.append(actor)
                    pool.idle.append(actor)
                self._submit(call, pool.idle.popleft())
            # Every actor is busy. While the backlog is at least one call per actor, send each actor its
            # next call now: it waits in the actor's queue and starts as soon as the current one ends.
            for depth in range(1, self.pipeline):
                for actor in list(pool.actors):
                    while pool.queue and not self._wanted(pool.queue[0]):
                        pool.queue.popleft()
                    if len(pool.queue) < len(pool.actors):
                        break
                    if len(pool.lines.get(actor, ())) == depth:
                        self._submit(pool.queue.popleft(), actor)

    def _submit(self, call: Call, actor: Any) -> None:
        pool = call.pool
        line = pool.lines.setdefault(actor, deque())
        nodes = [int(m.metadata.dst_node_id) for m in call.messages]
        call.actor, call.ready_ref, call.started = actor, None, None
        if not line:  # it runs at once (calls queued behind others start when those are done)
            if actor in pool.warm:
                call.started = time.monotonic()
            else:  # actor calls run in order: `ready` returns when the actor can take the call
                call.ready_ref = actor.ready.remote()
        run_id = self._run.run_id
        states = [self.node_states.get(n) for n in nodes]
        if len(nodes) == 1:
            config = self.node_config(nodes[0])
            call.ref = actor.handle.remote(call.message, nodes[0], config, run_id, states[0])
        else:
            configs = [self.node_config(n) for n in nodes]
            call.ref = actor.handle_cohort.remote(call.messages, nodes, configs, run_id, states)
        line.append(call)

    def _progress(self, wait_s: float) -> None:
        """Collect finished calls (waiting up to ``wait_s``), enforce the per-call limit, refill pools."""
        self._retire_unplaceable()
        running = {
            c.ref: c for pool in self.pools for line in pool.lines.values() for c in line if c.ref is not None
        }
        starting = {c.ready_ref: c for c in running.values() if c.ready_ref is not None}
        if starting:
            up, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in up:
                call = starting.pop(ref)
                call.ready_ref, call.started = None, time.monotonic()
                call.pool.warm.add(call.actor)
        if running:
            timeout = wait_s
            timed = [c.started + self._limit(c) for c in running.values() if c.started is not None]
            if self.call_timeout_s is not None and timed:
                first_expiry = min(timed)
                timeout = max(0.0, min(wait_s, first_expiry - time.monotonic()))
            if starting:
                timeout = min(timeout, 0.05)
            refs = list(running)
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:  # take every call that has finished by now, not just the first
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            # An actor runs its calls in order: take each actor's finished calls front to back.
            finished = sorted((running[ref] for ref in ready), key=self._place_in_line)
            for call in finished:
                if call.ref is None:  # sent back to the queue when its actor was retired in this pass
                    continue
                try:
                    reply = self._result(call)
                except _ACTOR_DIED as err:
                    self._actor_died(call, err)
                    continue
                self._next_in_line(call)
                self._finish(call, reply)
            if self.call_timeout_s is not None:
                now = time.monotonic()
                for call in running.values():
                    if call.ref is None or call.started is None:
                        continue
                    if now - call.started > self._limit(call):
                        self._replace(call)
                        self._finish(call, [timeout_reply(m, self.call_timeout_s) for m in call.messages])
        self._dispatch()

    def _retire_unplaceable(self) -> None:
        """Retire the starting actors that asked for a custom resource whose node has since died (Ray keeps
        them pending forever, and a call's limit counts from its actor's start); their calls go back to the
        queue and the pool's next actor starts without it. Asked at most once a second, while one starts."""
        heads = [
            line[0]
            for pool in self.pools
            for actor, line in pool.lines.items()
            if line and line[0].ready_ref is not None and actor in pool.asked
        ]
        if not heads or time.monotonic() < self._next_placement_check:
            return
        self._next_placement_check = time.monotonic() + 1.0
        cluster = ray.cluster_resources()
        for call in heads:
            if unplaceable(call.pool, call.actor, cluster):
                self._replace(call)  # the calls behind it go back to the front of the queue
                call.actor = None
                call.pool.queue.appendleft(call)

    def _actor_died(self, call: Call, err: Exception) -> None:
        """``call``'s actor died. It ran its calls in order: those ahead of ``call`` may have finished; the
        first one that did not was running and fails; the ones after it never ran and go back to the queue."""
        line = list(call.pool.lines.get(call.actor, ())) or [call]
        culprit = call
        for ahead in line:
            if ahead is call or ahead.ref is None:
                break
            if ray.wait([ahead.ref], num_returns=1, timeout=5.0)[0]:
                try:
                    reply = self._result(ahead)
                except _ACTOR_DIED:
                    pass
                else:  # it finished before the actor died
                    self._next_in_line(ahead)
                    self._finish(ahead, reply)
                    continue
            culprit = ahead
            break
        self._replace(culprit, kill=False)
        died = f"actor died: {err}"
        self._finish(
            culprit,
            [Message(Error(ErrorCode.CLIENT_APP_CRASHED, died), reply_to=m) for m in culprit.messages],
        )

    def _result(self, call: Call) -> Message | list[Message]:
        """The replies of a finished ``call``; the states of the nodes whose call succeeded are kept."""
        replies, states = ray.get(call.ref)
        answers = replies if isinstance(replies, list) else [replies]
        states = states if isinstance(states, list) else [states]
        for msg, reply, state in zip(call.messages, answers, states, strict=True):
            # a call the round gave up on (its timeout) leaves the node's state as it was
            if not reply.has_error() and msg.metadata.message_id in self.pending:
                self.node_states.put(int(msg.metadata.dst_node_id), state)
        return replies

    @staticmethod
    def _place_in_line(call: Call) -> int:
        line = call.pool.lines.get(call.actor, ())
        return line.index(call) if call in line else 0

    def _next_in_line(self, call: Call) -> None:
        """``call`` ended on its actor: the next call queued there starts now, or the actor is free."""
        pool, actor = call.pool, call.actor
        line = pool.lines.get(actor)
        if line is not None and call in line:
            line.remove(call)
        pool.warm.add(actor)
        if line:
            nxt = line[0]
            if nxt.started is None and nxt.ref is not None:
                nxt.started = time.monotonic()
        elif actor in pool.actors:
            pool.idle.append(actor)

    def _limit(self, call: Call) -> float:
        """The wall-clock limit of ``call``: ``call_timeout_s`` per message in it."""
        return float(self.call_timeout_s or 0.0) * len(call.messages)

    def _finish(self, call: Call, replies: Message | list[Message]) -> None:
        """Record the replies to ``call``'s messages (one, or one per message) that are still awaited."""
        answers = replies if isinstance(replies, list) else [replies]
        for mid, reply in zip(call.mids, answers, strict=True):
            if self.pending.pop(mid, None) is not None:
                self.done[mid] = reply
        call.ref = None

    def _replace(self, call: Call, kill: bool = True) -> None:
        """Retire ``call``'s actor (killing it if still alive) and let the pool start a fresh one.

        Calls queued behind ``call`` on that actor never ran: they go back to the front of the pool's queue.
        """
        pool, actor = call.pool, call.actor
        call.ref = call.ready_ref = None
        if actor not in pool.actors:  # already retired
            return
        if kill:
            ray.kill(actor, no_restart=True)
        pool.actors.remove(actor)
        pool.warm.discard(actor)
        pool.asked.pop(actor, None)
        line = pool.lines.pop(actor, deque())
        for other in reversed([c for c in line if c is not call and self._wanted(c)]):
            other.actor = other.ref = other.ready_ref = other.started = None
            pool.queue.appendleft(other)
        pool.replaced += 1
