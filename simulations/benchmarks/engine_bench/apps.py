"""The trivial ClientApp of the overhead section (Ray workers import it as ``engine_bench.apps:echo_app``)."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

__all__ = ["ECHO_APP", "echo_app"]

ECHO_APP = "engine_bench.apps:echo_app"
"""``module:attribute`` of :data:`echo_app` for a ``RayGrid``'s ``app_ref``."""

echo_app = ClientApp()


@echo_app.train()
def echo_train(message: Message, context: Context) -> Message:
    """Echo the arrays with a few metrics, no Ray calls."""
    metrics = {
        "num-examples": 1,
        "partition-id": int(context.node_config.get("partition-id", -1)),
        "train-loss": 0.0,
    }
    arrays = message.content.array_records["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)


@echo_app.evaluate()
def echo_evaluate(message: Message, context: Context) -> Message:
    """Evaluation counterpart of :func:`echo_train`: metrics only."""
    metrics = {"num-examples": 1, "eval-loss": 0.0}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
