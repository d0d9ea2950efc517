"""``fedeq deploy ...``: real Flower SuperLink and SuperNodes with TLS and SuperNode authentication.

Subcommands::

    fedeq deploy certs     --out DIR [--nodes N] [--hosts H,...]        CA, certificates, node key pairs
    fedeq deploy superlink --certs DIR [--host H] [--port P]            run the SuperLink, register keys
    fedeq deploy register  --certs DIR --superlink H:P [--index I ...]  register more SuperNode keys
    fedeq deploy supernode --certs DIR --superlink H:P --index I --num-partitions N --tier NAME
    fedeq deploy submit    [CONFIG.yaml] [k=v ...] --superlink H:P --nodes N [--certs DIR]
    fedeq deploy run       [CONFIG.yaml] [k=v ...] --nodes N [--tiers A,B,...]   all of it on this machine

TLS and SuperNode authentication are on unless ``--insecure`` (local experiments only). A bad argument
exits with status 2 and one line naming it, before any process starts; a failed deployment exits 1; every
process started is stopped by pid on exit, Ctrl-C, SIGTERM and failure.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedeq.cli.config_args import check_runnable, split_config_args
from fedeq.config import ConfigError, load_config
from fedeq.engines.deploy import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    DeployError,
    LocalDeployment,
    Submission,
    app_dir,
    check_certs,
    check_port_free,
    default_out_dir,
    flwr_env,
    node_config_arg,
    node_tiers,
    prepare_run_config,
    register_node,
    split_address,
    superlink_argv,
    supernode_argv,
    wait_for_port,
    write_connection,
)
from fedeq.engines.deploy.certs import (
    DEFAULT_HOSTS,
    CertLayout,
    generate_deployment,
    public_keys,
    server_names,
)
from fedeq.engines.deploy.processes import ProcessRegistry, signals_raise

__all__ = ["add_deploy_parser", "cmd_deploy"]


def _say(msg: str) -> None:
    print(f"fedeq deploy: {msg}", file=sys.stderr, flush=True)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config followed by dotted overrides such as rounds=5",
    )


def _add_tls_args(p: argparse.ArgumentParser, certs_help: str) -> None:
    p.add_argument("--certs", metavar="DIR", help=certs_help)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication (local experiments only)",
    )


def add_deploy_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``deploy`` and its subcommands to the ``fedeq`` subparsers ``sub``."""
    dep = sub.add_parser("deploy", help="run on a real Flower SuperLink and SuperNodes (TLS, node auth)")
    ds = dep.add_subparsers(dest="deploy_command", required=True, metavar="COMMAND")

    p = ds.add_parser("certs", help="generate a CA, TLS certificates and SuperNode key pairs")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if missing)")
    p.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    p.add_argument(
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        help="comma-separated names/IPs the SuperLink is reached at (default: %(default)s)",
    )
    p.add_argument(
        "--force", action="store_true", help="regenerate everything, the CA included (default: keep files)"
    )

    p = ds.add_parser("superlink", help="run flower-superlink in the foreground and register node keys")
    _add_tls_args(p, "certificate folder from `fedeq deploy certs` (required unless --insecure)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_SUPERLINK_PORT, help="HTTPS port (default %(default)s)"
    )
    p.add_argument("--no-register", action="store_true", help="do not register node-auth/*.pub")
    p.add_argument("--workdir", metavar="DIR", help="keep FLWR_HOME and logs here (default: a temp folder)")

    p = ds.add_parser("register", help="register SuperNode public keys with a running SuperLink")
    p.add_argument("--certs", required=True, metavar="DIR", help="certificate folder (ca.pem, node-auth/)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--index", type=int, nargs="*", help="SuperNode indices (default: every node-auth/*.pub)")

    p = ds.add_parser("supernode", help="run one flower-supernode in the foreground")
    _add_tls_args(p, "folder with ca.pem, node-auth/supernode-<i> and supernode-<i>.pem/.key")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--index", type=int, required=True, help="this SuperNode's index (its key files)")
    p.add_argument("--partition-id", type=int, help="data partition (default: --index)")
    p.add_argument("--num-partitions", type=int, required=True, help="number of partitions (SuperNodes)")
    p.add_argument("--tier", help="device tier name (budgets and solver of this device)")
    p.add_argument("--config", metavar="CONFIG.yaml", help="check --tier against this config's tiers")
    p.add_argument("--host", default="127.0.0.1", help="address of the local Runtime API")
    p.add_argument("--port", type=int, default=DEFAULT_SUPERNODE_PORT, help="local Runtime API port")
    p.add_argument("--workdir", metavar="DIR", help="keep FLWR_HOME here (default: a temp folder)")

    p = ds.add_parser("submit", help="submit a run to a SuperLink with flwr run and wait for it")
    _add_config_args(p)
    _add_tls_args(p, "folder with ca.pem (required unless --insecure)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (= partitions)")
    p.add_argument("--app", metavar="DIR", help="Flower app folder (default: this checkout)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")

    p = ds.add_parser("run", help="SuperLink + N SuperNodes + the run, all on this machine")
    _add_config_args(p)
    _add_tls_args(p, "use these certificates (default: generate fresh ones in the work folder)")
    p.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    p.add_argument("--tiers", help="comma-separated tier per SuperNode (default: the config's assignment)")
    p.add_argument("--host", default="127.0.0.1", help="address everything binds to")
    p.add_argument("--port", type=int, help="SuperLink port (default: a free one)")
    p.add_argument("--workdir", metavar="DIR", help="keep certificates, FLWR_HOME and logs here")
    p.add_argument("--app", metavar="DIR", help="Flower app folder (default: this checkout)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    return dep


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _load_run_config(args: Sequence[str]) -> Any:
    path, overrides = split_config_args(args)
    cfg = load_config(path, overrides)
    import flwr.supercore.logger  # noqa: F401 - configures the "flwr" logger on import

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # the strategy's construction notes are not for this check
    try:
        check_runnable(cfg)  # strategy name / kwargs and data files, before any process starts
    finally:
        flwr_logger.setLevel(level)
    return cfg


def _certs(ns: argparse.Namespace, **need: Any) -> CertLayout | None:
    if ns.insecure:
        if ns.certs:
            raise DeployError("--insecure", "cannot be combined with --certs")
        return None
    if not ns.certs:
        raise DeployError("--certs", "a certificate folder is required (or --insecure for local experiments)")
    return check_certs(Path(ns.certs).resolve(), **need)


def _workdir(path: str | None, prefix: str) -> tuple[Path, bool]:
    if path:
        p = Path(path).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def _check_timeout(value: float) -> None:
    if not value > 0:
        raise DeployError("--timeout", f"must be > 0 seconds (got {value:g})")


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise DeployError(key, f"must be >= 1 (got {value})")


def _foreground(registry: ProcessRegistry, name: str) -> int:
    proc = registry.get(name)
    while proc.alive():
        time.sleep(0.5)
    return int(proc.returncode() or 0)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def _cmd_certs(ns: argparse.Namespace) -> int:
    if ns.nodes < 0:
        raise DeployError("--nodes", f"must be >= 0 (got {ns.nodes})")
    hosts = [h.strip() for h in ns.hosts.split(",") if h.strip()]
    if not hosts:
        raise DeployError("--hosts", "at least one host name or IP address is required")
    layout = generate_deployment(ns.out, ns.nodes, hosts=hosts, overwrite=ns.force)
    print(
        f"certificates for the SuperLink ({', '.join(hosts)}) and {ns.nodes} SuperNode(s) in {layout.folder}"
    )
    return 0


def _cmd_superlink(ns: argparse.Namespace) -> int:
    layout = _certs(ns, server=True)
    check_port_free(ns.host, ns.port, "--port")
    workdir, temp = _workdir(ns.workdir, "fedeq-superlink-")
    try:
        with ProcessRegistry(workdir / "logs") as reg:
            proc = reg.start(
                "superlink",
                superlink_argv(layout, ns.host, ns.port),
                env=flwr_env(workdir / "home"),
                capture=False,
            )
            _say(f"SuperLink pid {proc.pid} on {ns.host}:{ns.port}")
            local = ns.host if ns.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            wait_for_port(local, ns.port, 60, proc, "SuperLink")
            if layout is not None and not ns.no_register:
                names = server_names(layout.server_cert)
                name = next((n for n in (ns.host, "127.0.0.1", "localhost") if n in names), names[0])
                _register(layout, f"{name}:{ns.port}", None, workdir / "cli-home")
            _say("running; Ctrl-C stops it")
            return _foreground(reg, "superlink")
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


def _register(layout: CertLayout, address: str, indices: Sequence[int] | None, home: Path) -> None:
    keys = public_keys(layout.folder)
    if indices:
        missing = [i for i in indices if i not in keys]
        if missing:
            raise DeployError("--index", f"no node-auth/supernode-{missing[0]}.pub in {layout.folder}")
        keys = {i: keys[i] for i in indices}
    env = flwr_env(home)
    write_connection(env["FLWR_HOME"], address, layout.ca_cert)
    for i, key in keys.items():
        node_id = register_node(key, env)
        _say(f"registered SuperNode {i} ({key.name}) as node {node_id}")


def _cmd_register(ns: argparse.Namespace) -> int:
    split_address(ns.superlink)
    ns.insecure = False
    layout = _certs(ns)
    assert layout is not None
    home = Path(tempfile.mkdtemp(prefix="fedeq-register-"))
    try:
        _register(layout, ns.superlink, ns.index, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


def _cmd_supernode(ns: argparse.Namespace) -> int:
    split_address(ns.superlink)
    if ns.index < 0:
        raise DeployError("--index", f"must be >= 0 (got {ns.index})")
    _positive(ns.num_partitions, "--num-partitions")
    pid = ns.index if ns.partition_id is None else ns.partition_id
    if not 0 <= pid < ns.num_partitions:
        raise DeployError("--partition-id", f"must be in 0..{ns.num_partitions - 1} (got {pid})")
    if ns.tier is not None and ns.config is not None:
        try:
            cfg = load_config(ns.config)
        except ConfigError as err:
            raise DeployError("--config", str(err)) from None
        node_tiers(cfg, 1, [ns.tier], key="--tier")
    layout = _certs(ns, node_private=[ns.index])
    check_port_free(ns.host, ns.port, "--port")
    workdir, temp = _workdir(ns.workdir, "fedeq-supernode-")
    try:
        with ProcessRegistry(workdir / "logs") as reg:
            argv = supernode_argv(
                ns.superlink,
                layout,
                ns.index,
                node_config_arg(pid, ns.num_partitions, ns.tier),
                host=ns.host,
                port=ns.port,
                auth=layout is not None,
            )
            proc = reg.start("supernode", argv, env=flwr_env(workdir / "home"), capture=False)
            _say(
                f"SuperNode {ns.index} (partition {pid}/{ns.num_partitions}, tier {ns.tier}) pid {proc.pid} "
                f"-> {ns.superlink}; Ctrl-C stops it"
            )
            return _foreground(reg, "supernode")
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


def _cmd_submit(ns: argparse.Namespace) -> int:
    cfg = _load_run_config(ns.args)
    split_address(ns.superlink)
    _positive(ns.nodes, "--nodes")
    layout = _certs(ns)
    app = app_dir(ns.app)
    _check_timeout(ns.timeout)
    out = default_out_dir(cfg).resolve()
    cfg = prepare_run_config(cfg, ns.nodes, out)
    home = Path(tempfile.mkdtemp(prefix="fedeq-submit-"))
    try:
        with ProcessRegistry(home / "logs") as reg:
            env = flwr_env(home / "home")
            write_connection(env["FLWR_HOME"], ns.superlink, layout.ca_cert if layout else None)
            sub = Submission(reg, env, app, cfg, _say)
            sub.start()
            outcome = sub.wait(ns.timeout, require_outputs=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if outcome.summary:
        print(f"results written to {outcome.out_dir}")
    else:
        print(
            f"run {outcome.run_id} completed; the results are on the SuperLink's machine in {outcome.out_dir}"
        )
    return 0


def _cmd_run(ns: argparse.Namespace) -> int:
    cfg = _load_run_config(ns.args)
    _positive(ns.nodes, "--nodes")
    _check_timeout(ns.timeout)
    if ns.insecure and ns.certs:
        raise DeployError("--insecure", "cannot be combined with --certs")
    tiers = [t.strip() for t in ns.tiers.split(",")] if ns.tiers else None
    with LocalDeployment(
        cfg,
        ns.nodes,
        workdir=ns.workdir,
        tiers=tiers,
        insecure=ns.insecure,
        certs=ns.certs,
        host=ns.host,
        port=ns.port,
        app=ns.app,
        log=_say,
    ) as dep:
        outcome = dep.run(timeout=ns.timeout)
    s = outcome.summary
    _say(
        f"test accuracy {s.get('initial_test_acc', float('nan')):.4f} -> "
        f"{s.get('final_test_acc', float('nan')):.4f} in {s.get('rounds_completed')} rounds"
    )
    print(f"results written to {outcome.out_dir}")
    return 0


_COMMANDS = {
    "certs": _cmd_certs,
    "superlink": _cmd_superlink,
    "register": _cmd_register,
    "supernode": _cmd_supernode,
    "submit": _cmd_submit,
    "run": _cmd_run,
}


def cmd_deploy(ns: argparse.Namespace) -> int:
    """Dispatch ``fedeq deploy <command>``: 0 on success, 2 on a bad argument, 1 on failure, 130 on Ctrl-C."""
    try:
        with signals_raise():
            return _COMMANDS[ns.deploy_command](ns)
    except (DeployError, ConfigError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # strategy name / kwargs
        print(f"fedeq: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say("interrupted; every process started was stopped")
        return 130
    except (RuntimeError, OSError) as err:
        print(f"fedeq: error: deploy failed: {err}", file=sys.stderr)
        return 1
