"""Tiny ClientApps for engine tests (imported by Ray workers as ``tests.apps:...``)."""

from __future__ import annotations

import os

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

probe_app = ClientApp()


@probe_app.train()
def probe(message: Message, context: Context) -> Message:
    """Echo the arrays back with the process id and the Ray resources this call holds."""
    import ray

    resources = ray.get_runtime_context().get_assigned_resources()
    metrics = {
        "num-examples": 1,
        "pid": os.getpid(),
        "cpus": float(resources.get("CPU", 0.0)),
        "partition-id": int(context.node_config["partition-id"]),
    }
    arrays = message.content.array_records["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)


fault_app = ClientApp()


@fault_app.train()
def fault_train(message: Message, context: Context) -> Message:
    """Misbehave as the message's config says: ``sleep`` seconds, then ``crash`` (the process exits) or
    ``raise``; else reply with the process id and the partition id."""
    import time

    config = message.content.config_records.get("config", {})
    time.sleep(float(config.get("sleep", 0.0)))
    if config.get("crash", False):
        os._exit(1)
    if config.get("raise", False):
        raise RuntimeError("asked to raise")
    pid = int(context.node_config["partition-id"])
    metrics = {"num-examples": 1, "pid": os.getpid(), "partition-id": pid}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
