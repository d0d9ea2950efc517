"""The SuperLink and the ``flwr`` CLI that talks to it: its command line, the private ``FLWR_HOME`` with
one connection, SuperNode key registration and run status."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedeq.engines.deploy.certs import CertLayout
from fedeq.engines.deploy.network import DEFAULT_SUPERLINK_PORT

__all__ = [
    "CONNECTION_NAME",
    "flwr_cli",
    "flwr_env",
    "register_node",
    "run_status",
    "superlink_argv",
    "toml_items",
    "write_connection",
]

#: Name of the SuperLink connection written to the private ``FLWR_HOME/config.toml``.
CONNECTION_NAME = "fedeq"


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


def _toml_value(value: str | bool) -> str:
    """A TOML string or boolean (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(str(value))


def toml_items(items: Mapping[str, str | bool]) -> str:
    """``key = value`` lines (TOML)."""
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
    text = f"[superlink]\ndefault = {_toml_value(name)}\n\n[superlink.{name}]\n{toml_items(conn)}"
    path.write_text(text, encoding="utf-8")
    return path


def flwr_cli(args: Sequence[str], env: Mapping[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """Run ``flwr ARGS`` with ``env``; (return code, stdout + stderr), 124 on timeout."""
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
        args = ["supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"]
        rc, out = flwr_cli(args, env)
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
    rc, out = flwr_cli(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"], env)
    if rc != 0:
        return f"unknown ({out.strip()[-300:]})"
    try:
        runs = _json_tail(out).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"
    except (ValueError, KeyError, IndexError):
        return "unknown"
