"""SuperNodes: their command line, the node config their ClientApp reads, and their device tiers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedeq.devices.assign import assign_tiers
from fedeq.engines.deploy.certs import CertLayout
from fedeq.engines.deploy.layout import DeployError
from fedeq.engines.deploy.network import DEFAULT_SUPERNODE_PORT

__all__ = ["node_config_arg", "node_tiers", "supernode_argv"]


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
