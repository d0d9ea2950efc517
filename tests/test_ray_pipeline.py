"""RayGrid with calls queued ahead on busy actors: order, per-call limits, crashes, abandoned rounds,
and the partitions the driver installs in the actors."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from fedeq.engines.ray.engine import server_identity  # noqa: E402
from fedeq.engines.ray.grid import NODE_ID_OFFSET, RayGrid  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TIER = SimpleNamespace(name="t", share=1.0, num_cpus=1.0, num_gpus=0.0)


def _messages(*configs: dict) -> list[Message]:
    with server_identity():
        return [
            Message(RecordDict({"config": ConfigRecord(cfg)}), NODE_ID_OFFSET + i, MessageType.TRAIN)
            for i, cfg in enumerate(configs)
        ]


def _grid(n: int, size: int = 1, **kwargs) -> RayGrid:
    grid = RayGrid([TIER], [0] * n, app_ref="tests.apps:fault_app", sizes=[size], **kwargs)
    grid.warm_up()
    return grid


def _partition_ids(replies: list[Message]) -> list[int | None]:
    return [int(r.content["metrics"]["partition-id"]) if r.has_content() else None for r in replies]


@pytest.mark.parametrize("pipeline", [1, 2])
def test_backlog_runs_in_order_on_one_actor(pipeline):
    grid = _grid(6, pipeline=pipeline)
    try:
        replies = grid.send_and_receive(_messages(*[{"sleep": 0.05}] * 6))
        assert _partition_ids(replies) == list(range(6))
        assert len({r.content["metrics"]["pid"] for r in replies}) == 1
        assert not any(grid.pools[0].lines.values()) and list(grid.pools[0].idle) == grid.pools[0].actors
        stats = grid.actor_stats()
        assert stats[0]["calls"] == 6 and stats[0]["busy_s"] >= 6 * 0.05
    finally:
        grid.shutdown()


def test_a_hung_call_is_cut_and_the_calls_queued_behind_it_run_elsewhere():
    grid = _grid(4, call_timeout_s=3.0)
    try:
        t0 = time.monotonic()
        replies = grid.send_and_receive(_messages({"sleep": 60.0}, {}, {}, {}))
        assert time.monotonic() - t0 < 30
        assert replies[0].has_error() and "timeout" in replies[0].error.reason
        assert _partition_ids(replies)[1:] == [1, 2, 3]
        assert grid.pools[0].replaced == 1
        # The fresh actor serves the next round.
        assert _partition_ids(grid.send_and_receive(_messages({}, {}))) == [0, 1]
    finally:
        grid.shutdown()


def test_a_crash_fails_only_the_running_call():
    grid = _grid(4)
    try:
        replies = grid.send_and_receive(_messages({}, {"crash": True}, {}, {}))
        assert replies[1].has_error() and replies[1].error.code == ErrorCode.CLIENT_APP_CRASHED
        assert _partition_ids(replies) == [0, None, 2, 3]
        raised = grid.send_and_receive(_messages({"raise": True}, {}))
        assert raised[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert _partition_ids(raised) == [None, 1]
    finally:
        grid.shutdown()


def test_an_abandoned_round_leaves_the_grid_usable():
    grid = _grid(3)
    try:
        t0 = time.monotonic()
        assert grid.send_and_receive(_messages({"sleep": 60.0}, {}, {}), timeout=2.0) == []
        assert time.monotonic() - t0 < 10 and not grid.pending
        assert _partition_ids(grid.send_and_receive(_messages({}, {}, {}))) == [0, 1, 2]
    finally:
        grid.shutdown()


def test_work_stays_balanced_at_the_end_of_a_round():
    # Two actors, one long call among short ones: the short calls must not wait behind the long one.
    grid = _grid(6, size=2)
    try:
        t0 = time.monotonic()
        replies = grid.send_and_receive(_messages({"sleep": 3.0}, *[{"sleep": 0.2}] * 5))
        elapsed = time.monotonic() - t0
        assert _partition_ids(replies) == list(range(6))
        assert elapsed < 3.0 + 2.0  # not 3.0 + 0.2 * k for short calls stuck behind the long one
    finally:
        grid.shutdown()


GONE = {"fedeq_gone_node": 1.0}


@pytest.fixture
def first_actor_unchecked(monkeypatch, caplog) -> list[dict]:
    """The options each new actor starts with; the first one asks for ``GONE``, a resource no node has,
    unchecked: the window between Ray reporting an actor dead and declaring its node dead, forced. Ray keeps
    such an actor pending forever."""
    import fedeq.engines.ray.actors as actors

    checked = actors.placeable_options
    started: list[dict] = []

    def unchecked_first(pool):
        started.append(dict(pool.options) if not started else checked(pool))
        return started[-1]

    monkeypatch.setattr(actors, "placeable_options", unchecked_first)
    caplog.set_level("WARNING", logger="fedeq.engines.ray.pools")
    return started


def _gone_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "fedeq_gone_node" in r.getMessage()]


@pytest.mark.timeout(120)
def test_an_actor_asking_for_a_resource_whose_node_died_is_replaced(first_actor_unchecked, caplog):
    """A call waiting for such an actor goes back to the queue and runs on the pool's next actor."""
    tier = SimpleNamespace(**vars(TIER), resources=GONE)
    grid = RayGrid([tier], [0] * 3, app_ref="tests.apps:fault_app", sizes=[1], call_timeout_s=30.0)
    try:
        t0 = time.monotonic()
        replies = grid.send_and_receive(_messages({}, {}, {}), timeout=60.0)
        assert _partition_ids(replies) == [0, 1, 2]
        assert time.monotonic() - t0 < 30
        assert [s.get("resources") for s in first_actor_unchecked] == [GONE, None]
        assert grid.pools[0].replaced == 1 and not grid.pools[0].asked
        warnings = _gone_warnings(caplog)
        assert len(warnings) == 1 and "is gone from the cluster" in warnings[0]
    finally:
        grid.shutdown()


@pytest.mark.timeout(120)
def test_warm_up_replaces_an_actor_asking_for_a_resource_whose_node_died(first_actor_unchecked, caplog):
    """The same at the start of a run: waiting for the pools' actors does not wait forever."""
    tier = SimpleNamespace(**vars(TIER), resources=GONE)
    grid = RayGrid([tier], [0] * 2, app_ref="tests.apps:fault_app", sizes=[2])
    try:
        t0 = time.monotonic()
        grid.warm_up()
        assert time.monotonic() - t0 < 30
        pool = grid.pools[0]
        assert [s.get("resources") for s in first_actor_unchecked] == [GONE, None, None]
        assert pool.replaced == 1 and not pool.asked and len(pool.actors) == 2
        assert set(pool.warm) == set(pool.actors) == set(pool.idle)
        assert len(_gone_warnings(caplog)) == 1
        assert _partition_ids(grid.send_and_receive(_messages({}, {}))) == [0, 1]
    finally:
        grid.shutdown()


def test_actors_use_the_partitions_the_driver_installed():
    from fedeq.config import load_config
    from fedeq.data import clients as data

    cfg = load_config(None, ["num_clients=10", "data.partition=iid"])
    parts = data.client_partitions(cfg.data, 10, cfg.seed)
    assert len(parts) == 10 and sum(len(p) for p in parts) > 30
    fake = tuple(np.arange(i, i + 3, dtype=np.int64) for i in range(10))  # recognisably not the real ones
    grid = RayGrid([TIER], [0] * 10, app_ref="tests.apps:fault_app", sizes=[1])
    try:
        grid.set_actor_setup(data.install_partitions, (cfg.data, 10, cfg.seed, fake))
        grid.warm_up()
        actor = grid.pools[0].actors[0]
        assert ray.get(actor.setup.remote((_partition_sizes, (cfg.data, 10, cfg.seed)))) == [3] * 10
    finally:
        grid.shutdown()
    data.install_partitions(cfg.data, 10, cfg.seed, fake)
    try:
        assert _partition_sizes(cfg.data, 10, cfg.seed) == [3] * 10
    finally:
        data._INSTALLED_PARTITIONS.clear()
    assert data.client_partitions(cfg.data, 10, cfg.seed) is parts


def _partition_sizes(data_cfg, n: int, seed: int) -> list[int]:
    from fedeq.data import partition_sizes

    return partition_sizes(data_cfg, n, seed)
