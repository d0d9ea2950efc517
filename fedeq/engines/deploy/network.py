"""Addresses and ports of a deployment: parse, check, pick a free one, wait until one listens."""

from __future__ import annotations

import re
import socket
import time

from fedeq.engines.deploy.layout import DeployError
from fedeq.engines.deploy.processes import ManagedProcess

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "check_port_free",
    "free_port",
    "split_address",
    "wait_for_port",
]

#: Flower's default ports: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port; each
#: SuperNode serves its local Runtime API (for the ClientApp processes) on another.
DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_SUPERNODE_PORT = 9094


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
