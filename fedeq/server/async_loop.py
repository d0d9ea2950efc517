"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022) on the simulated clock.

``concurrency`` clients train at once, each on the model version current when it was sent. Replies are
taken in the order of their simulated arrival (:mod:`fedeq.server.async_schedule`); each arrival frees its
slot, which is refilled at once (a seeded draw among the idle nodes) with the current version. Once
``buffer_size`` (``K``) replies with content have arrived, the server makes version ``v + 1`` from them::

    τ_i = v − v_i,    θ_{v+1} = θ_v + η_g · Σ_i p_i · s(τ_i) · (θ_i − θ_{v_i})

with ``p_i`` the strategy's weights (FedAvg: ``n_i / Σ n``): every reply is rebased to
``θ_v + η_g s(τ_i) Δ_i`` (:func:`strategies.staleness.rebase`) and the configured strategy, behind its reply
guard, aggregates the rebased replies as a synchronous round (``server_round = v + 1``). Error, offline and
too-stale replies (``τ > max_staleness``) go to the guard with the update they arrive in, counted, never
averaged. Each version then passes through the callbacks like a synchronous round (central evaluation,
results, checkpoint): ``rounds`` counts versions.

A call is trained when it is dispatched (``grid.send_and_receive``; calls dispatched at the same simulated
instant go in one batch); its reply waits, with its simulated duration, until its arrival is due. The
message's ``server-round`` is the call's dispatch index (so per-call seeds differ when a client trains twice
on one version); ``model-version`` is ``v_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedeq.arrays import record_to_numpy
from fedeq.server.async_schedule import AsyncState, Flight
from fedeq.server.callbacks.base import RoundCallback
from strategies.staleness import rebase, staleness_weight

__all__ = ["MODEL_VERSION_KEY", "AsyncSettings", "run_async"]

MODEL_VERSION_KEY = "model-version"
"""Config key of a train message: the model version the client trains on."""

UpdateHook = Callable[[int, float, list[dict[str, Any]]], None]
"""``(version, simulated time, per-reply extras)``: called when a version is made, before the callbacks."""


@dataclass(frozen=True)
class AsyncSettings:
    """The ``async`` section: ``K``, concurrency, staleness function ``s``, its exponent, ``η_g``, and the
    largest staleness aggregated (``None``: any)."""

    buffer_size: int = 10
    concurrency: int = 20
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5
    server_lr: float = 1.0
    max_staleness: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> AsyncSettings:
        """The settings of ``cfg``'s ``async`` section (concurrency null: ``min(2K, num_clients)``)."""
        section = getattr(cfg, "async")
        k = int(section.buffer_size)
        concurrency = section.concurrency or min(2 * k, int(cfg.num_clients))
        return cls(
            buffer_size=k,
            concurrency=int(concurrency),
            staleness=str(section.staleness),
            staleness_exponent=float(section.staleness_exponent),
            server_lr=float(section.server_lr),
            max_staleness=None if section.max_staleness is None else int(section.max_staleness),
        )


def _template(
    strategy: Strategy, version: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
) -> RecordDict:
    """The content of a train message for the next version, as the strategy configures it (its sampled
    nodes are not used: the loop picks its own)."""
    messages = list(strategy.configure_train(version, arrays, ConfigRecord(dict(config)), grid))
    if messages:
        return messages[0].content
    return RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})


def _train_message(template: RecordDict, node: int, dispatch: int, version: int) -> Message:
    records: dict[str, Any] = dict(template.items())
    key = next((k for k, r in records.items() if isinstance(r, ConfigRecord)), "config")
    config = dict(records.get(key, ConfigRecord()))
    config.update({"server-round": dispatch, MODEL_VERSION_KEY: version})
    records[key] = ConfigRecord(config)
    return Message(RecordDict(records), dst_node_id=node, message_type=MessageType.TRAIN)


def _dispatch(
    state: AsyncState,
    grid: Grid,
    template: RecordDict,
    concurrency: int,
    duration: Callable[[Message], float],
    timeout: float,
) -> None:
    """Fill the free slots at the current simulated time: draw idle nodes, train them in one batch, and put
    the calls in flight with their replies and simulated durations."""
    nodes = sorted(int(n) for n in grid.get_node_ids())
    chosen: list[int] = []
    while len(state.in_flight) + len(chosen) < min(concurrency, len(nodes)):
        node = state.pick(n for n in nodes if n not in chosen)
        if node is None:
            break
        chosen.append(node)
    if not chosen:
        return
    first = state.dispatched + 1
    messages = [_train_message(template, n, first + i, state.version) for i, n in enumerate(chosen)]
    state.dispatched += len(chosen)
    replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages, timeout=timeout)}
    flights = []
    for i, (node, msg) in enumerate(zip(chosen, messages, strict=True)):
        reply = replies.get(node)
        if reply is None:
            reply = Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "no reply in time"), reply_to=msg)
        d = float(duration(reply)) if reply.has_content() else 0.0
        flights.append(Flight(first + i, node, state.version, state.clock, max(d, 0.0), reply))
    state.add(flights)


def _rebased_reply(flight: Flight, arrays: ArrayRecord | None, metrics: dict[str, Any]) -> Message:
    """``flight``'s reply with its one ArrayRecord replaced by ``arrays`` (when given) and ``metrics`` added
    to its one MetricRecord; replies of another shape are returned as they are (the guard rejects them)."""
    reply = flight.reply
    records: dict[str, Any] = dict(reply.content.items())
    array_keys = [k for k, r in records.items() if isinstance(r, ArrayRecord)]
    metric_keys = [k for k, r in records.items() if isinstance(r, MetricRecord)]
    if len(array_keys) != 1 or len(metric_keys) != 1:
        return reply
    if arrays is not None:
        records[array_keys[0]] = arrays
    records[metric_keys[0]] = MetricRecord({**dict(records[metric_keys[0]]), **metrics})
    instruction = Message(RecordDict(), dst_node_id=flight.node, message_type=MessageType.TRAIN)
    return Message(RecordDict(records), reply_to=instruction)


def _buffer_replies(
    state: AsyncState, buffer: Sequence[Flight], settings: AsyncSettings
) -> tuple[list[Message], list[dict[str, Any]]]:
    """The replies to aggregate into the next version (rebased) and their ``clients.csv`` extras."""
    current = state.bases[state.version]
    messages, extras = [], []
    for f in buffer:
        tau = state.version - f.version
        s = staleness_weight(settings.staleness, tau, settings.staleness_exponent)
        extras.append(
            {
                "dispatch": f.dispatch,
                "model_version": f.version,
                "staleness": tau,
                "staleness_weight": s,
                "start_s": f.start,
                "arrival_s": f.arrival,
            }
        )
        if not f.reply.has_content():
            messages.append(f.reply)
            continue
        too_stale = settings.max_staleness is not None and tau > settings.max_staleness
        trained = [r for r in f.reply.content.values() if isinstance(r, ArrayRecord)]
        rebased = None
        if not too_stale and len(trained) == 1:
            rebased = rebase(current, state.bases[f.version], trained[0], settings.server_lr * s)
        messages.append(_rebased_reply(f, rebased, {"staleness": tau, "staleness-weight": s}))
    return messages, extras


def staleness_check(max_staleness: int | None) -> Callable[[Any], tuple[str, str] | None]:
    """Reply check for the guard: ``dropped`` when the reply's ``staleness`` exceeds ``max_staleness``."""

    def check(metrics: Any) -> tuple[str, str] | None:
        tau = metrics.get("staleness")
        if max_staleness is not None and tau is not None and tau > max_staleness:
            return "dropped", f"stale: staleness {int(tau)} > async.max_staleness={max_staleness}"
        return None

    return check


def _counts(flight: Flight, state: AsyncState, settings: AsyncSettings) -> bool:
    """Whether an arrival fills a buffer slot: a reply with content, not staler than ``max_staleness``."""
    tau = state.version - flight.version
    fresh = settings.max_staleness is None or tau <= settings.max_staleness
    return flight.reply.has_content() and fresh


def run_async(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    settings: AsyncSettings,
    state: AsyncState,
    *,
    duration: Callable[[Message], float],
    train_config: ConfigRecord | None = None,
    callbacks: Sequence[RoundCallback] = (),
    on_update: UpdateHook | None = None,
    overlap: bool = False,
    timeout: float = 3600.0,
) -> Result:
    """Make versions ``state.version + 1 .. num_rounds``; return Flower's ``Result`` for them.

    ``state`` is fresh (version 0) or restored from a checkpoint (then ``arrays`` are that version's).
    ``duration(reply)`` gives a reply's simulated seconds. Raises ``RuntimeError`` when
    ``50 · concurrency`` arrivals in a row bring no update (every client failing or offline).
    """
    train_config = ConfigRecord() if train_config is None else train_config
    result = Result(arrays=arrays)

    def finish(version: int, version_arrays: ArrayRecord) -> None:
        metrics: dict[str, Any] = {}
        for callback in callbacks:
            metrics.update(callback.after_round(version, version_arrays, metrics) or {})
        numbers = {k: v for k, v in metrics.items() if type(v) in (int, float)}
        if numbers:
            result.evaluate_metrics_serverapp[version] = MetricRecord(numbers)

    for callback in callbacks:
        callback.on_run_start(state.version + 1, arrays)
    if state.version == 0:
        finish(0, arrays)
    state.bases[state.version] = dict(record_to_numpy(arrays))
    limit = 50 * max(settings.concurrency, 1)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedeq-update-end") as pool:
        pending: Future[None] | None = None
        while state.version < num_rounds:
            template = _template(strategy, state.version + 1, arrays, train_config, grid)
            buffer: list[Flight] = []
            filled, streak = 0, 0
            while filled < settings.buffer_size:
                _dispatch(state, grid, template, settings.concurrency, duration, timeout)
                flight = state.pop_arrival()
                buffer.append(flight)
                useful = _counts(flight, state, settings)
                filled += useful
                streak = 0 if useful else streak + 1
                if streak >= limit:
                    problem = f"no client update in {streak} calls in a row (version {state.version})"
                    raise RuntimeError(problem)
            if pending is not None:
                pending.result()
            messages, extras = _buffer_replies(state, buffer, settings)
            new_arrays, train_metrics = strategy.aggregate_train(state.version + 1, messages)
            state.version += 1
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[state.version] = train_metrics
            state.bases[state.version] = dict(record_to_numpy(arrays))
            state.prune_bases()
            if on_update is not None:
                on_update(state.version, state.clock, extras)
            for callback in callbacks:
                callback.on_round_end(state.version, arrays)
            if overlap and state.version < num_rounds:
                pending = pool.submit(finish, state.version, arrays)
            else:
                pending = None
                finish(state.version, arrays)
    for callback in callbacks:
        callback.on_run_end(result)
    return result
