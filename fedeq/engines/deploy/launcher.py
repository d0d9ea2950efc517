"""Run fedeq on Flower's deployment runtime: one SuperLink, many SuperNodes, ``flwr run`` to submit.

Building blocks (each usable on its own machine):

* :func:`superlink_argv` / :func:`supernode_argv`: the ``flower-superlink`` / ``flower-supernode`` command
  lines, TLS and SuperNode authentication on unless ``insecure``;
* :func:`write_connection`, :func:`register_node`, :func:`submit_argv`, :func:`run_status`: the ``flwr`` CLI
  against that SuperLink, with ``FLWR_HOME`` in a private folder (:func:`flwr_env`);
* :func:`prepare_run_config`: the fedeq config of a deployed run (one partition per SuperNode, absolute
  output folder) written as a ``flwr run --run-config`` TOML file;
* :class:`LocalDeployment`: everything on this machine (certificates, SuperLink, N SuperNodes, the run,
  the results), every process stopped by pid on exit, Ctrl-C and failure.

Argument problems raise :class:`DeployError` naming the argument, before anything is started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedeq.config.core import RUN_CONFIG_KEY, RUN_OVERRIDES_KEY, apply_overrides, assign_tiers, to_yaml
from fedeq.engines.deploy.certs import DEFAULT_HOSTS, CertError, CertLayout, check_layout, generate_deployment
from fedeq.engines.deploy.processes import ManagedProcess, ProcessRegistry
from fedeq.results.recorder import run_dir

__all__ = [
    "CONNECTION_NAME",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "DeployError",
    "LocalDeployment",
    "RunOutcome",
    "Submission",
    "app_dir",
    "check_certs",
    "check_port_free",
    "default_out_dir",
    "default_run_name",
    "flwr_env",
    "free_port",
    "node_config_arg",
    "node_tiers",
    "prepare_run_config",
    "register_node",
    "run_status",
    "split_address",
    "submit_argv",
    "superlink_argv",
    "supernode_argv",
    "verify_outputs",
    "wait_for_port",
    "write_connection",
    "write_run_config",
]

#: Flower's default ports: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port; each
#: SuperNode serves its local Runtime API (for the ClientApp processes) on another.
DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_SUPERNODE_PORT = 9094
#: Name of the SuperLink connection written to the private ``FLWR_HOME/config.toml``.
CONNECTION_NAME = "fedeq"
OUTPUT_FILES = ("config.yaml", "rounds.csv", "clients.csv", "summary.json")


class DeployError(ValueError):
    """A bad launcher argument or a deployment that could not be brought up; ``key`` names the argument."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


# ---------------------------------------------------------------------------------------------
# Environment, ports, paths
# ---------------------------------------------------------------------------------------------


def flwr_env(flwr_home: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private ``FLWR_HOME``, no update check, no runtime installs."""
    env = dict(os.environ if base is None else base)
    home = Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, key: str = "--port") -> None:
    """Raise :class:`DeployError` naming ``key`` when ``host:port`` is invalid or already in use."""
    if not 1 <= port <= 65535:
        raise DeployError(key, f"{port} is not a TCP port (1..65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise DeployError(
                key, f"{host}:{port} is already in use or cannot be bound ({err.strerror})"
            ) from None


def wait_for_port(
    host: str, port: int, timeout: float, proc: ManagedProcess | None = None, what: str = "process"
) -> None:
    """Wait until something accepts TCP connections on ``host:port`` (fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{what} exited with code {proc.returncode()} before listening on {host}:{port}:\n"
                + proc.log_tail()
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def split_address(address: str, key: str = "--superlink") -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) → (host, port); :class:`DeployError` naming ``key`` when malformed."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", address.strip())
    if not m:
        raise DeployError(key, f"expected HOST:PORT, got {address!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise DeployError(key, f"{port} is not a TCP port (1..65535)")
    return host, port


def check_certs(folder: str | Path, **need: Any) -> CertLayout:
    """:func:`~fedeq.engines.deploy.certs.check_layout` with key ``--certs``; its errors as :class:`DeployError`."""
    try:
        return check_layout(folder, key="--certs", **need)
    except CertError as err:
        raise DeployError(err.key, str(err).split(": ", 1)[1]) from None


def app_dir(path: str | Path | None = None) -> Path:
    """The Flower app folder (``pyproject.toml`` with ``[tool.flwr.app]``): ``path`` or this checkout."""
    candidate = Path(path) if path is not None else Path(__file__).resolve().parents[3]
    pyproject = candidate / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise DeployError(
            "--app", f"{candidate} is not a Flower app folder (pyproject.toml with [tool.flwr.app])"
        )
    return candidate.resolve()


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


def superlink_argv(
    certs: CertLayout | None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    auth: bool = True,
) -> list[str]:
    """``flower-superlink`` with TLS (``certs``) and SuperNode authentication; ``certs=None``: insecure."""
    argv = ["flower-superlink", "--host", host, "--port", str(port)]
    if certs is None:
        return [*argv, "--insecure"]
    argv += [
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
    ]
    if auth:
        argv.append("--enable-supernode-auth")
    return argv


def node_config_arg(partition_id: int, num_partitions: int, tier: str | None) -> str:
    """The ``--node-config`` string the ClientApp reads (``partition-id``, ``num-partitions``, ``tier``)."""
    items = [f"partition-id={int(partition_id)}", f"num-partitions={int(num_partitions)}"]
    if tier is not None:
        items.append(f"tier={json.dumps(str(tier))}")
    return " ".join(items)


def supernode_argv(
    superlink: str,
    certs: CertLayout | None,
    index: int,
    node_config: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERNODE_PORT,
    auth: bool = True,
    max_retries: int | None = None,
    private_key: Path | None = None,
) -> list[str]:
    """``flower-supernode`` number ``index`` connecting to ``superlink``; ``certs=None``: insecure.

    With ``certs``, the SuperLink is verified against ``ca.pem``, the node
    authenticates with ``node-auth/supernode-<index>`` (``auth``; ``private_key`` overrides it), and its
    local Runtime API uses ``supernode-<index>.pem``.
    """
    argv = ["flower-supernode", "--superlink", superlink, "--node-config", node_config]
    argv += ["--host", host, "--port", str(port)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if certs is None:
        return [*argv, "--insecure"]
    argv += ["--root-certificates", str(certs.ca_cert)]
    if certs.node_cert(index).is_file():
        argv += [
            "--ssl-certfile",
            str(certs.node_cert(index)),
            "--ssl-keyfile",
            str(certs.node_cert_key(index)),
            "--ssl-ca-certfile",
            str(certs.ca_cert),
        ]
    if auth:
        argv += ["--auth-supernode-private-key", str(private_key or certs.node_keys(index).private_key)]
    return argv


def _toml_value(value: str | bool) -> str:
    """A TOML string or boolean (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(str(value))


def _toml_items(items: Mapping[str, str | bool]) -> str:
    """``key = value`` lines."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in items.items())


def write_connection(
    flwr_home: str | Path, address: str, ca_cert: Path | None, name: str = CONNECTION_NAME
) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one SuperLink connection (``ca_cert=None``: insecure)."""
    conn: dict[str, Any] = {"address": address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(ca_cert).resolve())
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"[superlink]\ndefault = {_toml_value(name)}\n\n[superlink.{name}]\n{_toml_items(conn)}"
    path.write_text(text, encoding="utf-8")
    return path


def _flwr(args: Sequence[str], env: Mapping[str, str], timeout: float = 60.0) -> tuple[int, str]:
    import subprocess

    try:
        done = subprocess.run(
            ["flwr", *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return 124, f"flwr {' '.join(args)} timed out after {timeout:.0f}s"
    return done.returncode, done.stdout + done.stderr


def _json_tail(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise ValueError(text.strip()[-500:])
    return json.loads(text[start : text.rindex("}") + 1])


def register_node(public_key: Path, env: Mapping[str, str], retries: int = 3) -> int:
    """Register a SuperNode public key with ``flwr supernode register``; return its node id."""
    last = ""
    for attempt in range(retries):
        rc, out = _flwr(["supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"], env)
        if rc == 0:
            try:
                data = _json_tail(out)
                if data.get("success"):
                    return int(data["node-id"])
            except (ValueError, KeyError):
                pass
        last = out.strip()
        time.sleep(1.0 + attempt)
    raise RuntimeError(f"could not register {public_key}: {last[-800:]}")


def run_status(run_id: int, env: Mapping[str, str]) -> str:
    """Status text of ``run_id`` (``running``, ``finished:completed``, ``finished:failed``, ...)."""
    rc, out = _flwr(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"], env)
    if rc != 0:
        return f"unknown ({out.strip()[-300:]})"
    try:
        runs = _json_tail(out).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"
    except (ValueError, KeyError, IndexError):
        return "unknown"


def submit_argv(app: Path, run_config: Path) -> list[str]:
    """``flwr run APP fedeq --run-config RUN.toml --stream``."""
    return ["flwr", "run", str(app), CONNECTION_NAME, "--run-config", str(run_config), "--stream"]


# ---------------------------------------------------------------------------------------------
# Run config and results
# ---------------------------------------------------------------------------------------------


def node_tiers(
    cfg: Any, num_nodes: int, tiers: Sequence[str] | None = None, key: str = "--tiers"
) -> list[str]:
    """Tier name of each SuperNode: ``tiers`` (checked against the config) or the config's assignment."""
    names = [str(t.name) for t in cfg.devices.tiers]
    if tiers is None:
        return [names[i] for i in assign_tiers(cfg)[:num_nodes]]
    tiers = list(tiers)
    if len(tiers) == 1 and num_nodes > 1:
        tiers = tiers * num_nodes
    if len(tiers) != num_nodes:
        raise DeployError(key, f"expected 1 or {num_nodes} tier names (one per SuperNode), got {len(tiers)}")
    for t in tiers:
        if t not in names:
            raise DeployError(key, f"unknown tier {t!r}; allowed: {', '.join(names)}")
    return tiers


def prepare_run_config(cfg: Any, num_nodes: int, out_dir: Path) -> Any:
    """The config of a deployed run: one partition per SuperNode, results in the absolute ``out_dir``."""
    if num_nodes < 1:
        raise DeployError("--nodes", f"must be >= 1 (got {num_nodes})")
    out_dir = Path(out_dir).resolve()
    items = [
        f"num_clients={num_nodes}",
        f"clients_per_round={min(int(cfg.clients_per_round), num_nodes)}",
        f"output_dir={json.dumps(str(out_dir.parent))}",
        f"run_name={json.dumps(out_dir.name)}",
    ]
    min_nodes = cfg.strategy.min_available_nodes
    if min_nodes is not None and int(min_nodes) > num_nodes:
        items.append(f"strategy.min_available_nodes={num_nodes}")
    return apply_overrides(cfg, items)


def write_run_config(cfg: Any, path: Path) -> Path:
    """Write the ``flwr run --run-config`` TOML file carrying the resolved config as YAML text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    items = {RUN_CONFIG_KEY: to_yaml(cfg), RUN_OVERRIDES_KEY: ""}
    path.write_text(_toml_items(items), encoding="utf-8")
    return path


def verify_outputs(out_dir: Path, rounds: int) -> dict[str, Any]:
    """Check the output folder of a finished run; return ``summary.json`` (RuntimeError if incomplete)."""
    missing = [name for name in OUTPUT_FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"the run finished without {', '.join(missing)} in {out_dir}")
    if not list(out_dir.glob("*.png")):
        raise RuntimeError(f"the run finished without plots in {out_dir}")
    summary = json.loads((out_dir / "summary.json").read_text())
    done = summary.get("rounds_completed")
    if done != rounds:
        raise RuntimeError(f"the run completed {done} of {rounds} rounds (see {out_dir / 'rounds.csv'})")
    return summary


def default_run_name() -> str:
    """``deploy-<timestamp>``."""
    return "deploy-" + time.strftime("%Y%m%d-%H%M%S")


def default_out_dir(cfg: Any) -> Path:
    """``output_dir/run_name`` of ``cfg``, the run name defaulting to :func:`default_run_name`."""
    return run_dir(cfg.output_dir, cfg.run_name or default_run_name())


# ---------------------------------------------------------------------------------------------
# Everything on this machine
# ---------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What a finished deployment run produced (``summary`` is empty when the results are elsewhere)."""

    out_dir: Path
    run_id: int | None
    status: str
    summary: dict[str, Any]
    wall_s: float
    node_ids: list[int] = field(default_factory=list)


class Submission:
    """One ``flwr run --stream`` against the connection in ``cli_env``'s ``FLWR_HOME``, then its results.

    ``cfg`` must already be prepared (:func:`prepare_run_config`): its ``output_dir/run_name`` is where
    the ServerApp, on the SuperLink's machine, writes the results.
    """

    def __init__(
        self,
        registry: ProcessRegistry,
        cli_env: Mapping[str, str],
        app: Path,
        cfg: Any,
        log: Callable[[str], None],
        name: str = "flwr-run",
    ) -> None:
        self.registry = registry
        self.name = name
        self.cli_env = dict(cli_env)
        self.app = app
        self.cfg = cfg
        self.out_dir = (Path(cfg.output_dir) / str(cfg.run_name)).resolve()
        self.run_id: int | None = None
        self._log = log
        self._proc: ManagedProcess | None = None
        self._t0 = time.perf_counter()

    def start(self) -> ManagedProcess:
        """Submit the run (returns at once; see :meth:`wait`)."""
        run_toml = write_run_config(self.cfg, self.registry.log_dir.parent / f"{self.name}.toml")
        self._t0 = time.perf_counter()
        self._proc = self.registry.start(
            self.name, submit_argv(self.app, run_toml), env=self.cli_env, cwd=self.app
        )
        self._log(f"submitted the run (flwr run pid {self._proc.pid}); results go to {self.out_dir}")
        return self._proc

    def _find_run_id(self) -> int | None:
        assert self._proc is not None
        m = re.search(r"Successfully started run (\d+)", self._proc.log_text())
        return int(m.group(1)) if m else None

    def wait(self, timeout: float = 1800.0, require_outputs: bool = True, poll: float = 1.0) -> RunOutcome:
        """Wait for the run to finish (RuntimeError on timeout or failure); check the output folder.

        With ``require_outputs=False`` a missing output folder is not an error (the SuperLink runs
        elsewhere and the results stay on its machine).
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError("the run was not submitted")
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            if self.run_id is None:
                self.run_id = self._find_run_id()
                if self.run_id is not None:
                    self._log(f"run {self.run_id} started")
            time.sleep(poll)
        self.run_id = self.run_id or self._find_run_id()
        if self.run_id is None and not proc.alive():
            raise RuntimeError(f"flwr run could not submit the run:\n{proc.log_tail(30)}")
        status = "unknown"
        while self.run_id is not None and time.monotonic() < deadline + 10.0:
            # The log stream normally ends with the run; the status may lag it a little.
            status = run_status(self.run_id, self.cli_env)
            if status.startswith("finished"):
                break
            time.sleep(2.0)
        if not status.startswith("finished"):
            if self.run_id is not None:
                _flwr(["stop", str(self.run_id), CONNECTION_NAME], self.cli_env)
            raise RuntimeError(
                f"the run did not finish within {timeout:.0f}s (status {status}; "
                f"logs in {self.registry.log_dir})"
            )
        if status != "finished:completed":
            raise RuntimeError(
                f"run {self.run_id} ended with status {status}:\n{proc.log_tail(30)}\n"
                f"(logs in {self.registry.log_dir})"
            )
        summary: dict[str, Any] = {}
        if require_outputs or self.out_dir.is_dir():
            summary = verify_outputs(self.out_dir, int(self.cfg.rounds))
        wall_s = time.perf_counter() - self._t0
        self._log(f"run {self.run_id} {status} in {wall_s:.1f}s")
        return RunOutcome(
            out_dir=self.out_dir, run_id=self.run_id, status=status, summary=summary, wall_s=wall_s
        )


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on this machine, and one run submitted to them.

    ``start()`` generates certificates (unless ``certs`` is given), starts the SuperLink, registers the
    SuperNodes' public keys, starts the SuperNodes and waits until they are connected; ``submit()``
    starts ``flwr run``; ``wait()`` waits for the run and checks the output folder. Leaving the ``with``
    block (normally, on error or on Ctrl-C) stops every process by pid.
    """

    def __init__(
        self,
        cfg: Any,
        num_nodes: int,
        *,
        workdir: str | Path | None = None,
        out_dir: str | Path | None = None,
        tiers: Sequence[str] | None = None,
        insecure: bool = False,
        certs: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        app: str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise DeployError("--nodes", f"must be >= 1 (got {num_nodes})")
        self.num_nodes = num_nodes
        self.insecure = insecure
        self.host = host
        self.app = app_dir(app)
        if out_dir is None:
            out_dir = default_out_dir(cfg)
        self.out_dir = Path(out_dir).resolve()
        self.cfg = prepare_run_config(cfg, num_nodes, self.out_dir)
        self.tiers = node_tiers(self.cfg, num_nodes, tiers)
        if port is not None:
            check_port_free(host, port, "--port")
        self.port = port
        if certs is not None and not insecure:
            check_certs(
                certs,
                server=True,
                node_certs=range(num_nodes),
                node_private=range(num_nodes),
                node_public=range(num_nodes),
            )
        self.given_certs = Path(certs).resolve() if certs is not None else None
        self._tmp = None if workdir is not None else tempfile.mkdtemp(prefix="fedeq-deploy-")
        self.workdir = Path(workdir if workdir is not None else self._tmp).resolve()  # type: ignore[arg-type]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.registry = ProcessRegistry(self.workdir / "logs")
        self.cli_env = flwr_env(self.workdir / "home" / "cli")
        self.layout: CertLayout | None = None
        self.node_ids: list[int] = []
        self.node_ports: list[int] = []
        self.run_id: int | None = None
        self.submission: Submission | None = None
        self._log = log or (lambda msg: print(f"fedeq deploy: {msg}", file=sys.stderr, flush=True))

    # -- context management ------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process started here (by pid), keep the logs next to the results."""
        if self.registry.processes:
            self._log(f"stopping {len(self.registry.running())} process(es)")
        self.registry.stop_all()
        if self.out_dir.is_dir():
            logs = self.out_dir / "deploy"
            logs.mkdir(exist_ok=True)
            for f in (self.workdir / "logs").glob("*"):
                if f.is_file():
                    shutil.copy2(f, logs / f.name)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- steps ----------------------------------------------------------------------------------

    @property
    def connect_host(self) -> str:
        """Where the SuperNodes and ``flwr`` reach the SuperLink (loopback when it binds all interfaces)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def superlink_address(self) -> str:
        host = self.connect_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        """Certificates, SuperLink, key registration, SuperNodes; return once all SuperNodes connected."""
        if not self.insecure:
            if self.given_certs is not None:
                self.layout = CertLayout(self.given_certs)
            else:
                self.layout = generate_deployment(
                    self.workdir / "certs", self.num_nodes, hosts=[*DEFAULT_HOSTS, self.host]
                )
        if self.port is None:
            self.port = free_port(self.host)
        self.node_ports = [free_port(self.host) for _ in range(self.num_nodes)]
        sl = self.registry.start(
            "superlink",
            superlink_argv(self.layout, self.host, self.port, auth=not self.insecure),
            env=flwr_env(self.workdir / "home" / "superlink"),
            cwd=self.workdir,
        )
        self._log(
            f"SuperLink pid {sl.pid} on {self.superlink_address} ({'insecure' if self.insecure else 'TLS'})"
        )
        wait_for_port(self.connect_host, self.port, timeout, sl, "flower-superlink")
        write_connection(
            self.cli_env["FLWR_HOME"], self.superlink_address, self.layout.ca_cert if self.layout else None
        )
        if self.layout is not None:
            keys = [self.layout.node_keys(i).public_key for i in range(self.num_nodes)]
            with ThreadPoolExecutor(max_workers=min(8, self.num_nodes)) as pool:
                self.node_ids = list(pool.map(lambda key: register_node(key, self.cli_env), keys))
            self._log(f"registered {len(self.node_ids)} SuperNode public keys")
        for i in range(self.num_nodes):
            self.start_supernode(i)
        self.wait_nodes(timeout)

    def start_supernode(self, index: int, **kwargs: Any) -> ManagedProcess:
        """Start SuperNode ``index`` (partition ``index`` of ``num_nodes``, tier ``self.tiers[index]``)."""
        argv = supernode_argv(
            self.superlink_address,
            self.layout,
            index,
            node_config_arg(index, self.num_nodes, self.tiers[index]),
            host=self.host,
            port=self.node_ports[index],
            auth=not self.insecure,
            **kwargs,
        )
        proc = self.registry.start(
            f"supernode-{index}",
            argv,
            env=flwr_env(self.workdir / "home" / f"supernode-{index}"),
            cwd=self.workdir,
        )
        self._log(
            f"SuperNode {index} pid {proc.pid}: partition {index}/{self.num_nodes}, tier {self.tiers[index]}"
        )
        return proc

    def wait_nodes(self, timeout: float = 120.0, names: Sequence[str] | None = None) -> None:
        """Wait until the SuperNodes logged their node id (connected and, with auth, accepted)."""
        names = list(names or [f"supernode-{i}" for i in range(self.num_nodes)])
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                proc = self.registry.get(name)
                if "SuperNode ID:" in proc.log_text():
                    pending.discard(name)
                elif not proc.alive():
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode()} before connecting:\n{proc.log_tail()}"
                    )
            time.sleep(0.3)
        if pending:
            raise RuntimeError(f"{', '.join(sorted(pending))} did not connect within {timeout:.0f}s")
        self._log(f"{len(names)} SuperNode(s) connected")

    def submit(
        self, cfg: Any | None = None, out_dir: str | Path | None = None, name: str = "flwr-run"
    ) -> ManagedProcess:
        """Submit a run with ``flwr run --stream`` (returns at once; see :meth:`wait`).

        Without ``cfg``: the deployment's own run. Otherwise ``cfg`` is prepared for these SuperNodes with
        its results in ``out_dir``; ``name`` (the ``flwr run`` process and log) must differ per submission.
        """
        run_cfg = self.cfg
        if cfg is not None:
            target = out_dir or default_out_dir(cfg)
            run_cfg = prepare_run_config(cfg, self.num_nodes, Path(target))
        self.submission = Submission(self.registry, self.cli_env, self.app, run_cfg, self._log, name=name)
        return self.submission.start()

    def wait(self, timeout: float = 1800.0) -> RunOutcome:
        """Wait for the submitted run to finish; check and return its outputs."""
        if self.submission is None:
            raise RuntimeError("the run was not submitted")
        outcome = self.submission.wait(timeout)
        self.run_id = outcome.run_id
        outcome.node_ids = list(self.node_ids)
        self._write_deploy_json(outcome)
        return outcome

    def run(self, timeout: float = 1800.0) -> RunOutcome:
        """``start()``, ``submit()`` and ``wait()``."""
        self.start()
        self.submit()
        return self.wait(timeout)

    def _write_deploy_json(self, outcome: RunOutcome) -> None:
        data = {
            "run_id": outcome.run_id,
            "status": outcome.status,
            "superlink": self.superlink_address,
            "tls": not self.insecure,
            "node_auth": not self.insecure,
            "supernodes": [
                {
                    "index": i,
                    "partition_id": i,
                    "num_partitions": self.num_nodes,
                    "tier": self.tiers[i],
                    "node_id": self.node_ids[i] if i < len(self.node_ids) else None,
                    "runtime_port": self.node_ports[i],
                }
                for i in range(self.num_nodes)
            ],
            "wall_s": outcome.wall_s,
        }
        (outcome.out_dir / "deploy.json").write_text(json.dumps(data, indent=2))
