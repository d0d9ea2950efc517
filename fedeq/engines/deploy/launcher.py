"""Everything on this machine: certificates, a SuperLink, N SuperNodes, one run and its results.

:class:`LocalDeployment` stops every process it started by pid on exit, Ctrl-C and failure. The building
blocks it uses work on their own machine too: :mod:`~fedeq.engines.deploy.superlink`,
:mod:`~fedeq.engines.deploy.supernode`, :mod:`~fedeq.engines.deploy.submission`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedeq.engines.deploy.certs import DEFAULT_HOSTS, CertLayout, generate_deployment
from fedeq.engines.deploy.layout import DeployError, app_dir, check_certs, default_out_dir
from fedeq.engines.deploy.network import check_port_free, free_port, wait_for_port
from fedeq.engines.deploy.processes import ManagedProcess, ProcessRegistry
from fedeq.engines.deploy.submission import RunOutcome, Submission, prepare_run_config
from fedeq.engines.deploy.superlink import flwr_env, register_node, superlink_argv, write_connection
from fedeq.engines.deploy.supernode import node_config_arg, node_tiers, supernode_argv

__all__ = ["LocalDeployment"]


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
