"""Deployment on real Flower processes: SuperLink + SuperNodes on 127.0.0.1 with TLS and node authentication.

The end-to-end tests share one deployment (1 SuperLink, 3 SuperNodes) started once per module; every process
is stopped by pid in the fixture's teardown and the last test checks that none is left.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedeq.cli.main import main
from fedeq.config import load_config
from fedeq.engines.deploy import (
    CONNECTION_NAME,
    LocalDeployment,
    flwr_env,
    node_config_arg,
    node_tiers,
    supernode_argv,
)
from fedeq.engines.deploy.certs import (
    NodeKeys,
    check_layout,
    generate_deployment,
    generate_node_keys,
    load_public_key_openssh,
    server_names,
)
from fedeq.engines.deploy.processes import ProcessRegistry, descendants, kill_tree, pid_alive
from fedeq.engines.deploy.superlink import flwr_cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
HAVE_FLOWER = all(shutil.which(x) for x in ("flower-superlink", "flower-supernode", "flwr"))
needs_flower = pytest.mark.skipif(not HAVE_FLOWER, reason="Flower's executables are not on PATH")

# ---------------------------------------------------------------------------------------------
# Certificates and key pairs (no processes)
# ---------------------------------------------------------------------------------------------


def test_certificates_chain_to_the_ca_and_keys_load_as_flower_loads_them(tmp_path: Path) -> None:
    layout = generate_deployment(tmp_path / "certs", 2, hosts=["127.0.0.1", "superlink.lan"])
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert set(server_names(layout.server_cert)) == {"127.0.0.1", "superlink.lan"}
    for i in range(2):
        x509.load_pem_x509_certificate(layout.node_cert(i).read_bytes()).verify_directly_issued_by(ca)
        keys = layout.node_keys(i)
        private = load_ssh_private_key(keys.private_key.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert load_public_key_openssh(keys.public_key) == private.public_key()
        assert keys.private_key.stat().st_mode & 0o077 == 0
    check_layout(layout.folder, server=True, node_certs=[0, 1], node_private=[0, 1], node_public=[0, 1])
    layout.node_keys(1).private_key.unlink()
    with pytest.raises(ValueError, match="--certs: missing file .*supernode-1"):
        check_layout(layout.folder, node_private=[1])


def test_existing_files_are_kept_when_devices_are_added(tmp_path: Path) -> None:
    layout = generate_deployment(tmp_path, 1)
    files = (layout.ca_cert, layout.server_cert, layout.node_cert(0), layout.node_keys(0).public_key)
    before = [f.read_bytes() for f in files]
    generate_deployment(tmp_path, 2)
    assert [f.read_bytes() for f in files] == before
    assert layout.node_keys(1).public_key.is_file()
    generate_deployment(tmp_path, 2, hosts=["10.0.0.1"])  # new address: new SuperLink certificate only
    assert server_names(layout.server_cert) == ["10.0.0.1"]
    assert layout.ca_cert.read_bytes() == before[0]
    generate_deployment(tmp_path, 2, overwrite=True)
    assert layout.ca_cert.read_bytes() != before[0]
    assert layout.node_keys(0).public_key.read_bytes() != before[3]


def test_node_config_and_tiers() -> None:
    assert node_config_arg(1, 3, "phone") == 'partition-id=1 num-partitions=3 tier="phone"'
    cfg = load_config(QUICK)
    assert node_tiers(cfg, 3) == ["small", "large", "small"]
    assert node_tiers(cfg, 3, ["large"]) == ["large"] * 3
    with pytest.raises(ValueError, match="--tiers: unknown tier 'huge'; allowed: small, large"):
        node_tiers(cfg, 3, ["small", "huge", "large"])


# ---------------------------------------------------------------------------------------------
# Bad launcher arguments: exit 2, one line naming the argument, nothing started
# ---------------------------------------------------------------------------------------------


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, err.getvalue()


@pytest.fixture
def busy_port() -> object:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _assert_refused(args: list[str], key: str, *fragments: str) -> None:
    rc, err = _cli(args)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fedeq: error: {key}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_cert_folder_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-folder")
    work = tmp_path / "work"
    _assert_refused(
        ["deploy", "run", str(QUICK), "--certs", missing, "--workdir", str(work)], "--certs", missing
    )
    assert not work.exists()
    node = ["--superlink", "127.0.0.1:9092", "--index", "0", "--num-partitions", "3"]
    _assert_refused(["deploy", "supernode", "--certs", missing, *node], "--certs", "does not exist")
    _assert_refused(["deploy", "superlink", "--certs", missing], "--certs", "does not exist")
    _assert_refused(["deploy", "supernode", *node], "--certs", "--insecure")
    (tmp_path / "partial").mkdir()
    generate_deployment(tmp_path / "partial", 0)
    _assert_refused(
        ["deploy", "run", "--certs", str(tmp_path / "partial"), "--nodes", "2"], "--certs", "supernode-0"
    )


def test_port_in_use_is_refused(tmp_path: Path, busy_port: int) -> None:
    work = tmp_path / "work"
    _assert_refused(
        ["deploy", "run", str(QUICK), "--port", str(busy_port), "--workdir", str(work)],
        "--port",
        f"127.0.0.1:{busy_port} is already in use",
    )
    assert not work.exists()
    _assert_refused(["deploy", "superlink", "--insecure", "--port", str(busy_port)], "--port", "in use")
    _assert_refused(
        [
            "deploy",
            "supernode",
            "--insecure",
            "--superlink",
            "127.0.0.1:9092",
            "--index",
            "0",
            "--num-partitions",
            "1",
            "--port",
            str(busy_port),
        ],
        "--port",
        "in use",
    )


def test_unknown_tier_is_refused(tmp_path: Path) -> None:
    _assert_refused(
        ["deploy", "run", str(QUICK), "--tiers", "small,huge,large", "--workdir", str(tmp_path / "w")],
        "--tiers",
        "unknown tier 'huge'",
        "small, large",
    )
    assert not (tmp_path / "w").exists()
    node = ["--superlink", "127.0.0.1:9092", "--index", "0", "--num-partitions", "3", "--insecure"]
    _assert_refused(
        ["deploy", "supernode", *node, "--tier", "huge", "--config", str(QUICK)], "--tier", "huge"
    )


def test_other_bad_arguments_are_refused() -> None:
    _assert_refused(["deploy", "run", "--nodes", "0"], "--nodes", ">= 1")
    _assert_refused(
        ["deploy", "submit", "--superlink", "nohost", "--nodes", "2", "--insecure"], "--superlink"
    )
    _assert_refused(["deploy", "run", "rounds=0"], "rounds", "out of range")
    _assert_refused(
        ["deploy", "supernode", "--insecure", "--superlink", "h:1", "--index", "3", "--num-partitions", "3"],
        "--partition-id",
    )


# ---------------------------------------------------------------------------------------------
# Real processes: one TLS + node-auth deployment shared by the tests below
# ---------------------------------------------------------------------------------------------

TIERS = ["large", "small", "large"]  # differs from the config's own assignment (small, large, small)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> object:
    if not HAVE_FLOWER:
        pytest.skip("Flower's executables are not on PATH")
    base = tmp_path_factory.mktemp("deploy")
    cfg = load_config(QUICK, ["rounds=2", "strategy.name=quality", "train.device=cpu"])
    dep = LocalDeployment(cfg, 3, workdir=base / "work", out_dir=base / "out" / "e2e", tiers=TIERS, log=print)
    try:
        dep.start(timeout=120)
        yield dep
    finally:
        dep.stop()


def _wait_exit(proc: object, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.2)
    return proc.returncode()  # type: ignore[attr-defined]


def _rejected_node_log(deployment: LocalDeployment, name: str, argv: list[str], home: Path) -> str:
    """Start a SuperNode that the SuperLink must turn away; check it exits without an id; return its log."""
    proc = deployment.registry.start(name, argv, env=flwr_env(home))
    rc = _wait_exit(proc, 60)
    log = proc.log_text()
    assert rc not in (None, 0), log
    assert "SuperNode ID:" not in log
    return log


@needs_flower
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_supernode_with_unregistered_key_is_refused(deployment: LocalDeployment, tmp_path: Path) -> None:
    rogue = generate_node_keys(NodeKeys(tmp_path / "rogue", tmp_path / "rogue.pub"))
    argv = supernode_argv(
        deployment.superlink_address,
        deployment.layout,
        0,
        node_config_arg(0, 3, "small"),
        port=_free_port(),
        private_key=rogue.private_key,
        max_retries=1,
    )
    log = _rejected_node_log(deployment, "rogue-node", argv, tmp_path / "home")
    assert "Failed to activate SuperNode" in log


@needs_flower
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_clients_without_the_ca_certificate_cannot_connect(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    assert deployment.layout is not None
    argv = supernode_argv(
        deployment.superlink_address,
        deployment.layout,
        0,
        node_config_arg(0, 3, "small"),
        port=_free_port(),
        max_retries=1,
    )
    i = argv.index("--root-certificates")
    del argv[i : i + 2]  # a registered key, but the SuperLink's certificate cannot be verified
    log = _rejected_node_log(deployment, "no-ca-node", argv, tmp_path / "home")
    assert "CERTIFICATE_VERIFY_FAILED" in log

    # The flwr CLI without the CA certificate cannot reach the Control API either.
    env = flwr_env(tmp_path / "cli-home")
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n[superlink.{CONNECTION_NAME}]\n'
        f'address = "{deployment.superlink_address}"\n'
    )
    rc, out = flwr_cli(["ls", CONNECTION_NAME], env, timeout=60)
    assert rc != 0, out
    # ... while it can with the CA certificate.
    rc, out = flwr_cli(["ls", CONNECTION_NAME], deployment.cli_env, timeout=60)
    assert rc == 0, out


@needs_flower
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_end_to_end_tls_node_auth_quality_strategy(deployment: LocalDeployment) -> None:
    deployment.submit()
    outcome = deployment.wait(timeout=300)
    out = outcome.out_dir
    for name in ("config.yaml", "rounds.csv", "clients.csv", "summary.json", "partitions.csv", "deploy.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.png"))
    summary = outcome.summary
    assert summary["rounds_completed"] == 2
    assert summary["strategy"] == "quality"
    assert summary["final_test_acc"] > summary["initial_test_acc"] + 0.2
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [1, 2]
    assert list(rounds["clients_ok"]) == [3, 3]
    assert rounds["test_acc"].iloc[-1] > rounds["test_acc"].iloc[0] - 0.05
    clients = pd.read_csv(out / "clients.csv")
    assert len(clients) == 6 and set(clients["status"]) == {"ok"}
    # Every SuperNode trained its own partition with the tier from its node config.
    by_partition = clients.groupby("partition")["tier"].agg(set).to_dict()
    assert by_partition == {0: {"large"}, 1: {"small"}, 2: {"large"}}
    assert set(clients["node_id"]) == set(outcome.node_ids)
    assert clients["quality"].notna().all()
    cfg = load_config(out / "config.yaml")
    assert cfg.num_clients == 3 and Path(cfg.output_dir).is_absolute()


@needs_flower
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_run_completes_when_a_supernode_is_killed_mid_round(deployment: LocalDeployment) -> None:
    victim = deployment.registry.get("supernode-2")
    assert victim.alive()
    seen = len(victim.log_text())
    cfg = load_config(QUICK, ["rounds=2", "strategy.min_available_nodes=2", "strategy.round_timeout_s=240"])
    out = deployment.out_dir.parent / "killed"
    deployment.submit(cfg, out_dir=out, name="flwr-run-killed")
    deadline = time.monotonic() + 180
    while "Receiving: train message" not in victim.log_text()[seen:]:
        assert time.monotonic() < deadline, "SuperNode 2 never received round 1"
        time.sleep(0.2)
    deployment.registry.kill("supernode-2")  # SIGKILL to the SuperNode and its ClientApp processes
    assert not victim.alive()
    outcome = deployment.wait(timeout=360)
    assert outcome.summary["rounds_completed"] == 2
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["clients_ok"]) == [2, 2]
    clients = pd.read_csv(out / "clients.csv")
    ok = clients[clients["status"] == "ok"]
    assert set(ok["partition"]) == {0, 1}


@needs_flower
@pytest.mark.slow
def test_every_process_is_stopped(deployment: LocalDeployment) -> None:
    tracked = [p.pid for p in deployment.registry.processes if p.alive()]
    family = tracked + [d for p in tracked for d in descendants(p)]
    assert len(tracked) == 3  # the SuperLink and the two SuperNodes left
    deployment.stop()
    time.sleep(0.5)
    assert [p for p in family if pid_alive(p)] == []
    assert (deployment.out_dir / "deploy" / "superlink.log").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_children(pid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not descendants(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return descendants(pid)


def test_registry_stops_a_process_tree_also_on_failure(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    script = f"import subprocess, time; subprocess.Popen({sleeper!r}, start_new_session=True); time.sleep(60)"
    with pytest.raises(RuntimeError, match="boom"), ProcessRegistry(tmp_path) as reg:
        proc = reg.start("tree", [sys.executable, "-c", script])
        kids = _wait_for_children(proc.pid)
        assert kids
        raise RuntimeError("boom")
    assert not proc.alive()
    assert [k for k in kids if pid_alive(k)] == []
    assert "tree" not in (tmp_path / "pids.json").read_text()


def test_kill_tree_kills_a_child_and_its_grandchild() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    script = (
        f"import subprocess, sys, time; g = subprocess.Popen({sleeper!r}); "
        "print(g.pid, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        assert descendants(child.pid) == [grandchild]
        assert pid_alive(child.pid) and pid_alive(grandchild)
        assert kill_tree(child.pid) == [child.pid, grandchild]
        child.wait(timeout=10)
        deadline = time.monotonic() + 10
        while pid_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child.pid)
        assert not pid_alive(grandchild)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_launcher_stops_its_processes_on_ctrl_c_and_sigterm(tmp_path: Path, sig: int) -> None:
    launcher = f"""
import sys, time
from fedeq.engines.deploy.processes import ProcessRegistry, signals_raise
try:
    with signals_raise(), ProcessRegistry({str(tmp_path)!r}) as reg:
        p = reg.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        print(p.pid, flush=True)
        time.sleep(60)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert pid_alive(child)
        time.sleep(0.3)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in out
    assert not pid_alive(child)
