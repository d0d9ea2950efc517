"""The ClientApp's per-call path: one config setup per process, tier lookup, reported metrics, and the
train handler's mods (device offline, injected faults, partial deadline) through the real ClientApp."""

from __future__ import annotations

import re
import time
import zlib

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

import clients.client_app as client_app
import clients.run_setup as run_setup
from fedeq.config import RUN_CONFIG_KEY, load_config, to_yaml
from fedeq.devices.assign import assign_tiers
from fedeq.devices.faults import InjectedFault
from tests.flwr_helpers import task_identity

QUICK = "simulations/configs/quick.yaml"


@pytest.fixture(scope="module")
def cfg():  # type: ignore[no-untyped-def]
    return load_config(QUICK, ["num_clients=6", "clients_per_round=6", "seed=3"])


def _call(  # type: ignore[no-untyped-def]
    cfg,
    pid: int,
    node_config: dict | None = None,
    server_round: int = 1,
    message_type: str = "train",
    arrays: ArrayRecord | None = None,
) -> Message:
    with task_identity():
        if arrays is None:  # the process' model: the weights the last call trained
            arrays = ArrayRecord(run_setup.model_for(cfg).state_dict())
        config = ConfigRecord({RUN_CONFIG_KEY: to_yaml(cfg), "server-round": server_round})
        content = RecordDict({"arrays": arrays, "config": config})
        message = Message(content, dst_node_id=1, message_type=message_type)
        nc = {"partition-id": pid, "num-partitions": cfg.num_clients} if node_config is None else node_config
        context = Context(run_id=1, node_id=10 + pid, node_config=nc, state=RecordDict(), run_config={})
        return client_app.app(message, context)


def test_config_is_read_once_per_process(cfg) -> None:  # type: ignore[no-untyped-def]
    run_setup._setup_from_text.cache_clear()
    first = _call(cfg, 0)
    second = _call(cfg, 1, server_round=2)
    info = run_setup._setup_from_text.cache_info()
    assert info.misses == 1 and info.hits > 0  # parsed once; the mods and the handler share it
    for reply in (first, second):
        assert not reply.has_error()
        metrics = reply.content.metric_records["metrics"]
        assert set(metrics) == set(client_app.TRAIN_METRIC_KEYS)
        assert metrics["compute-cpu-s"] > 0.0 and metrics["compute-s"] > 0.0


def test_tier_from_node_config_or_assignment(cfg) -> None:  # type: ignore[no-untyped-def]
    names = [t.name for t in cfg.devices.tiers]
    assignment = assign_tiers(cfg)
    for pid in range(cfg.num_clients):  # without a node-config tier: the config's assignment
        reply = _call(cfg, pid)
        assert reply.content.metric_records["metrics"]["tier"] == assignment[pid]
    other = names[1 - assignment[0]]  # a node config tier wins over the assignment
    reply = _call(cfg, 0, {"partition-id": 0, "num-partitions": cfg.num_clients, "tier": other})
    assert reply.content.metric_records["metrics"]["tier"] == names.index(other)


def test_unknown_node_tier_names_the_allowed_ones(cfg) -> None:  # type: ignore[no-untyped-def]
    allowed = ", ".join(t.name for t in cfg.devices.tiers)
    message = f"node config tier: unknown tier 'huge'; allowed: {allowed}"
    with pytest.raises(ValueError, match=re.escape(message)):  # engines turn it into an error reply
        _call(cfg, 0, {"partition-id": 0, "num-partitions": cfg.num_clients, "tier": "huge"})


# ------------------------------------------------------------------------------------ the train mods


def _spy_train_local(monkeypatch) -> list[dict]:  # type: ignore[no-untyped-def]
    """Record the keyword arguments of every ``train_local`` call of the train handler."""
    calls: list[dict] = []
    real = client_app.train_local

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "train_local", spy)
    return calls


def test_offline_device_answers_unavailable_without_training(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(
        QUICK,
        ["num_clients=6", "seed=3", "devices.tiers.0.availability=0.5", "devices.tiers.1.availability=0.5"],
    )
    calls = _spy_train_local(monkeypatch)
    names = [t.name for t in cfg.devices.tiers]
    tiers = assign_tiers(cfg)
    statuses = []
    for rnd in (1, 2):
        for pid in range(cfg.num_clients):
            # the draw the run's behaviour pins: seed / round / partition / stream 1 against the availability
            online = np.random.default_rng(zlib.crc32(f"3/{rnd}/{pid}/1".encode())).random() < 0.5
            reply = _call(cfg, pid, server_round=rnd)
            statuses.append(online)
            if online:
                assert not reply.has_error()
                continue
            assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
            assert reply.error.reason == (
                f"offline: partition {pid} ({names[tiers[pid]]}, availability 0.5) not reachable"
            )
    assert len(calls) == sum(statuses) and 0 < sum(statuses) < len(statuses)
    # the mods belong to the train handler: evaluation answers whatever the availability
    offline_pid = statuses.index(False)
    reply = _call(cfg, offline_pid, server_round=1, message_type="evaluate")
    assert not reply.has_error() and "eval-acc" in reply.content.metric_records["metrics"]


def test_injected_faults_raise_hang_or_poison_the_reply(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base = ["num_clients=6", "seed=3"]
    calls = _spy_train_local(monkeypatch)
    with pytest.raises(InjectedFault, match="injected fault: client raised"):
        _call(load_config(QUICK, [*base, "faults.raise_p=1"]), 0)
    assert calls == []  # raised before any work

    t0 = time.perf_counter()
    reply = _call(load_config(QUICK, [*base, "faults.hang_p=1", "faults.hang_s=0.3"]), 0)
    assert time.perf_counter() - t0 >= 0.3 and not reply.has_error()

    cfg = load_config(QUICK, base)
    initial = ArrayRecord(run_setup.model_for(cfg).state_dict())
    clean = _call(cfg, 0, arrays=initial)
    poisoned = _call(load_config(QUICK, [*base, "faults.nan_p=1"]), 0, arrays=initial)
    metrics, expected = (
        {k: v for k, v in r.content.metric_records["metrics"].items() if not k.startswith("compute")}
        for r in (poisoned, clean)
    )
    assert metrics == expected  # the metrics are honest: only the arrays are broken
    got, want = poisoned.content.array_records["arrays"], clean.content.array_records["arrays"]
    assert list(got.keys()) == list(want.keys())
    floats = [k for k in want.keys() if np.dtype(want[k].dtype).kind == "f"]
    assert np.isnan(got[floats[0]].numpy()).all()  # the first floating-point array is all NaN
    for key in [k for k in want.keys() if k != floats[0]]:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_partial_deadline_gives_the_handler_the_compute_budget_left(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base = ["num_clients=6", "seed=3", "devices.deadline_s=0.26"]
    calls = _spy_train_local(monkeypatch)
    cfg = load_config(QUICK, [*base, "devices.deadline_policy=partial"])
    initial = ArrayRecord(run_setup.model_for(cfg).state_dict())
    partial = _call(cfg, 0, arrays=initial)
    dropped = _call(load_config(QUICK, [*base, "devices.deadline_policy=drop"]), 0, arrays=initial)
    tier = cfg.devices.tiers[assign_tiers(cfg)[0]]
    nbytes = ArrayRecord(run_setup.model_for(cfg).state_dict()).count_bytes()
    comm = 8 * nbytes / (tier.bandwidth_down_mbps * 1e6) + 8 * nbytes / (tier.bandwidth_up_mbps * 1e6)
    comm += 2 * tier.latency_s
    assert calls[0]["sim_budget_s"] == pytest.approx(max(0.0, 0.26 - comm), rel=1e-12)
    assert calls[1]["sim_budget_s"] is None  # drop: the client trains to the end, the server drops it
    assert calls[0]["sim_cost_s"] == calls[1]["sim_cost_s"] == cfg.devices.nfe_cost_s / tier.speed
    samples = [r.content.metric_records["metrics"]["samples"] for r in (partial, dropped)]
    assert samples[0] < samples[1]  # training stopped at the deadline
