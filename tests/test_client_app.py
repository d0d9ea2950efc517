"""The ClientApp's per-call path: one config setup per process, tier lookup, reported metrics."""

from __future__ import annotations

import re

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import clients.client_app as client_app
from fedeq.config.core import RUN_CONFIG_KEY, assign_tiers, load_config, to_yaml
from tests.flwr_helpers import task_identity

QUICK = "simulations/configs/quick.yaml"


@pytest.fixture(scope="module")
def cfg():  # type: ignore[no-untyped-def]
    return load_config(QUICK, ["num_clients=6", "clients_per_round=6", "seed=3"])


def _call(cfg, pid: int, node_config: dict | None = None, server_round: int = 1) -> Message:  # type: ignore[no-untyped-def]
    with task_identity():
        arrays = ArrayRecord(client_app.model_for(cfg).state_dict())
        config = ConfigRecord({RUN_CONFIG_KEY: to_yaml(cfg), "server-round": server_round})
        content = RecordDict({"arrays": arrays, "config": config})
        message = Message(content, dst_node_id=1, message_type="train")
        nc = {"partition-id": pid, "num-partitions": cfg.num_clients} if node_config is None else node_config
        context = Context(run_id=1, node_id=10 + pid, node_config=nc, state=RecordDict(), run_config={})
        return client_app.app(message, context)


def test_config_is_read_once_per_process(cfg) -> None:  # type: ignore[no-untyped-def]
    client_app._setup_from_text.cache_clear()
    first = _call(cfg, 0)
    second = _call(cfg, 1, server_round=2)
    info = client_app._setup_from_text.cache_info()
    assert (info.misses, info.hits) == (1, 1)
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
