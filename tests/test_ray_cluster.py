"""fedeq on a Ray cluster: tiers pinned to nodes by custom resources, and a node that dies mid-run.

The end-to-end tests start a real two-node cluster on this machine (``ray start --head`` and a second raylet
with ``ray start --address``, both on 127.0.0.1, each with its own custom resource) and stop it again by the
process groups they started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import psutil
import pytest

ray = pytest.importorskip("ray")

from flwr.app import MessageType  # noqa: E402

from fedeq.config import ConfigError, load_config  # noqa: E402
from fedeq.engines.ray.pools import TierPool, actor_options, placeable_options, pool_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
POOLS_LOGGER = "fedeq.engines.ray.pools"
MARKER_ENV = "FEDEQ_TEST_RAY_CLUSTER"
"""Set in the environment of the test cluster's processes (their temporary folder), to find them all."""
PINNED = ["devices.tiers[0].resources={node_a: 1}", "devices.tiers[1].resources={node_b: 1}"]
"""Tier ``small`` on the head (``node_a``), tier ``large`` on the second node (``node_b``)."""

# ------------------------------------------------------------------------------------------------
# the tier key and the actor options
# ------------------------------------------------------------------------------------------------


def test_actor_options_ask_for_the_tiers_custom_resources() -> None:
    small, large = load_config(QUICK, ["devices.tiers[1].resources={node_b: 0.5}"]).devices.tiers
    assert actor_options(small) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert actor_options(large) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"node_b": 0.5}}


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        ("{node_b: -1}", "devices.tiers[0].resources.node_b", "a number >= 0.0001 (got -1.0)"),
        ("{node_b: 0}", "devices.tiers[0].resources.node_b", "a number >= 0.0001"),
        ('{"": 1}', "devices.tiers[0].resources", "a non-empty name"),
        ("{CPU: 1}", "devices.tiers[0].resources", "those are num_cpus, num_gpus and memory_mb"),
        ("{node_b: many}", "devices.tiers[0].resources.node_b", "a number"),
        ("[node_b]", "devices.tiers[0].resources", "a mapping"),
    ],
)
def test_bad_resources_name_the_tier_key(value: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(QUICK, [f"devices.tiers[0].resources={value}"])
    assert info.value.key == key, str(info.value)
    message = str(info.value)
    assert message.startswith(f"{key}: ") and "; allowed: " in message and fragment in message, message


def _tier(name: str, **resources: float) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, share=0.25, num_cpus=1.0, num_gpus=0.0, memory_mb=None, resources=resources
    )


def test_tiers_with_other_custom_resources_never_share_a_pool() -> None:
    plain = [_tier(f"t{i}") for i in range(4)]
    assert pool_groups(plain, 2.0)[0] == [[0, 1, 2, 3]]
    pinned = [_tier("a1", node_a=1), _tier("b1", node_b=1), _tier("a2", node_a=1), _tier("b2", node_b=1)]
    assert pool_groups(pinned, 2.0)[0] == [[0, 2], [1, 3]]


def test_a_pool_without_custom_resources_never_asks_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> dict[str, float]:
        raise AssertionError("ray.cluster_resources() was called")

    monkeypatch.setattr(ray, "cluster_resources", refuse)
    pool = TierPool("small", actor_options(_tier("small")), 1, 1)
    assert placeable_options(pool) == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_a_vanished_resource_is_dropped_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = {"CPU": 4.0, "node_a": 100.0, "node_b": 100.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    pool = TierPool("large", actor_options(_tier("large", node_a=1, node_b=1)), 1, 1)
    caplog.set_level(logging.WARNING, logger=POOLS_LOGGER)
    assert placeable_options(pool)["resources"] == {"node_a": 1.0, "node_b": 1.0}
    assert caplog.records == []

    del cluster["node_b"]  # the nodes started with node_b died
    for _ in range(3):  # e.g. three actors replaced, one warning
        assert placeable_options(pool) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"node_a": 1.0}}
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "pool large" in record.getMessage() and "node_b=1" in record.getMessage()

    cluster.pop("node_a")
    assert placeable_options(pool) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert len(caplog.records) == 2 and "node_a=1" in caplog.records[1].getMessage()


# ------------------------------------------------------------------------------------------------
# a real two-node cluster on loopback
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RayNode:
    """One ``ray start --block`` process (in its own process group) and the Ray processes it started."""

    name: str
    proc: subprocess.Popen
    log: Path

    def raylet_pid(self) -> int:
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        return next(p.pid for p in kids if p.name() == "raylet")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of the node (its process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def _start_node(
    name: str, temp_dir: Path, resources: dict[str, float], head_port: int, head: bool
) -> RayNode:
    ports = {
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    args = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--resources={json.dumps(resources)}",
        f"--object-store-memory={100 * 2**20}", f"--temp-dir={temp_dir / name}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    if head:
        args += [
            "--head",
            f"--port={head_port}",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ]
    else:
        args.append(f"--address=127.0.0.1:{head_port}")
    env = {
        **os.environ,
        MARKER_ENV: str(temp_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # a dead node is declared dead after about 1.5 s instead of Ray's default of about 15 s
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    log = temp_dir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RayNode(name, proc, log)


def _wait_for_start(node: RayNode, deadline: float) -> None:
    """Wait until ``node``'s ``ray start`` says that its processes are up."""
    while "Ray runtime started." not in node.log.read_text(errors="replace"):
        log = node.log.read_text(errors="replace")[-3000:]
        assert node.proc.poll() is None and time.monotonic() < deadline, f"{node.name} did not start: {log}"
        time.sleep(0.2)


def _wait_for_resources(address: str, nodes: list[RayNode], names: list[str], deadline: float) -> None:
    """Wait until the cluster at ``address`` has every resource in ``names`` (its nodes have joined)."""
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        while not all(name in ray.cluster_resources() for name in names):
            dead = [n.name for n in nodes if n.proc.poll() is not None]
            logs = "\n".join(n.log.read_text(errors="replace")[-2000:] for n in nodes)
            assert not dead and time.monotonic() < deadline, f"nodes did not join: {logs}"
            time.sleep(0.2)
    finally:
        ray.shutdown()


def _ours(proc: psutil.Process, marker: Path) -> bool:
    """Whether ``proc`` belongs to the nodes started with temporary folder ``marker`` (its command line
    names the folder, or it inherited their ``MARKER_ENV``)."""
    try:
        return str(marker) in " ".join(proc.cmdline()) or proc.environ().get(MARKER_ENV) == str(marker)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _stop(nodes: list[RayNode], marker: Path) -> list[int]:
    """Stop the nodes (SIGTERM, then SIGKILL to their process groups), then kill any process of theirs that
    is left; return the pids of the processes still there after that."""
    for node in nodes:
        node.kill(signal.SIGTERM)
    for node in nodes:
        try:
            node.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        node.kill(signal.SIGKILL)
        node.proc.wait(timeout=15)
    left = [proc for proc in psutil.process_iter() if proc.pid != os.getpid() and _ours(proc, marker)]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(left, timeout=10)
    return [proc.pid for proc in alive]


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    """A head with 2 CPUs and ``node_a`` and a second node with 2 CPUs and ``node_b``, both on 127.0.0.1."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as fedeq's own ray.init
    temp_dir = Path(tempfile.mkdtemp(prefix="fqc", dir="/tmp"))  # Ray's socket paths must stay short
    port = _free_port()
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    nodes = [_start_node("head", temp_dir, {"node_a": 100}, port, head=True)]
    try:
        nodes.append(_start_node("second", temp_dir, {"node_b": 100}, port, head=False))  # waits for the head
        _wait_for_start(nodes[0], deadline)
        _wait_for_resources(address, nodes, ["node_a", "node_b"], deadline)
        raylets = {node.raylet_pid(): node.name for node in nodes}
        yield SimpleNamespace(address=address, head=nodes[0], second=nodes[1], raylets=raylets)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        left = _stop(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert left == [], f"processes left behind: {left}"


def _placement(grid: Any, cluster: SimpleNamespace) -> dict[str, set[str]]:
    """Where each pool's live actors run: ``head`` or ``second`` (an actor's parent is its raylet)."""
    where: dict[str, set[str]] = {}
    for stats in grid.actor_stats():
        parent = psutil.Process(stats["pid"]).ppid()
        where.setdefault(stats["tier"], set()).add(cluster.raylets.get(parent, "?"))
    return where


def _run(cluster: SimpleNamespace, tmp_path: Path, name: str, rounds: int = 4) -> Path:
    from fedeq.engines.simulate import simulate

    overrides = [f"output_dir={tmp_path}", f"run_name={name}", "engine=ray", f"rounds={rounds}"]
    overrides += [f"ray.address={cluster.address}", "ray.call_timeout_s=60", *PINNED]
    return simulate(load_config(QUICK, overrides), quiet=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pinned_tiers_spread_over_both_nodes(
    cluster: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pinned tier's pool starts on the node with its resource, and the run completes."""
    from fedeq.engines.ray.grid import RayGrid

    seen: list[dict[str, set[str]]] = []
    wait_ready = RayGrid.wait_ready

    def wait_and_look(grid: RayGrid) -> None:
        wait_ready(grid)
        seen.append(_placement(grid, cluster))

    monkeypatch.setattr(RayGrid, "wait_ready", wait_and_look)
    out = _run(cluster, tmp_path, "spread")
    assert seen == [{"small": {"head"}, "large": {"second"}}]
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2, 3, 4]
    assert (rounds.clients_ok == 4).all() and (rounds.clients_failed == 0).all()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dead_node_moves_its_work_to_the_survivor(
    cluster: SimpleNamespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The second node (its raylet, agents and actors) is killed once round 1 is recorded (rounds are
    recorded while the next one trains); its tier's actors are replaced on the head and the run completes.

    Ray may report the dead actor as unavailable before it declares the node dead; a replacement started in
    that window still asks for ``node_b``: it dies with the node or, still waiting to be placed, is retired
    once ``node_b`` leaves the cluster, so the tier can lose one more round before its actors start on the
    head (``test_ray_pipeline`` forces the second case).
    """
    from fedeq.engines.ray.grid import RayGrid

    caplog.set_level(logging.WARNING, logger=POOLS_LOGGER)
    before: list[dict[str, set[str]]] = []
    killed: list[int] = []
    send_and_receive = RayGrid.send_and_receive

    def kill_once_round_1_is_recorded(grid: RayGrid, messages: Any, **kwargs: Any) -> Any:
        messages = list(messages)
        train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        if train and not killed and (tmp_path / "failover" / "rounds.csv").exists():
            killed.extend(pid for pid, name in cluster.raylets.items() if name == "second")
            cluster.second.kill()
        replies = send_and_receive(grid, messages, **kwargs)
        if train and not killed:
            before.append(_placement(grid, cluster))
        return replies

    monkeypatch.setattr(RayGrid, "send_and_receive", kill_once_round_1_is_recorded)
    out = _run(cluster, tmp_path, "failover", rounds=6)
    assert killed and not psutil.pid_exists(killed[0])
    assert before and all(seen == {"small": {"head"}, "large": {"second"}} for seen in before)

    rounds = pd.read_csv(out / "rounds.csv")
    clients = pd.read_csv(out / "clients.csv")
    assert rounds["round"].tolist() == [1, 2, 3, 4, 5, 6]
    assert rounds.clients_failed.sum() > 0 and (rounds.clients_ok + rounds.clients_failed == 4).all()
    failed = clients[clients.status == "failed"]
    assert (failed.tier == "large").all() and failed.reason.str.contains("actor died").all()
    # the second node is gone: the large tier's updates of the last round were computed on the head
    last = clients[clients["round"] == 6]
    assert (last.status == "ok").all() and (last.tier == "large").sum() == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == POOLS_LOGGER]
    assert len(warnings) == 1 and "pool large" in warnings[0] and "node_b=1" in warnings[0]
