"""Test helpers: real Flower Messages with run/task identity and an in-process Grid.

Flower's ``Message(content, dst_node_id, message_type)`` reads the run/task identity of the
current process (``TaskIdentity``), which only a running ServerApp/simulation sets.  The helpers
set it temporarily (``task_identity``), give messages a ``message_id`` the way the in-memory
grid does, and build replies with ``Message(content, reply_to=instruction)`` exactly as a
ClientApp would.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedeq.engines.run_grid import RunGrid, assign_message_id

__all__ = [
    "DEFAULT_RUN_ID",
    "ClientFn",
    "LocalGrid",
    "assign_message_id",
    "client_metrics",
    "make_error_reply",
    "make_instruction",
    "make_reply",
    "run_local",
    "task_identity",
    "to_array_record",
]

DEFAULT_RUN_ID = 4242

#: A simulated client: receives the instruction, returns reply content, an Error, or a reply Message.
ClientFn = Callable[[Message], RecordDict | Error | Message]


@contextlib.contextmanager
def task_identity(
    run_id: int = DEFAULT_RUN_ID, node_id: int = SUPERLINK_NODE_ID, task_id: int = 1
) -> Iterator[None]:
    """Temporarily set the process' Flower task identity (as the simulation runtime does)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def to_array_record(arrays: ArrayRecord | Mapping[str, Any]) -> ArrayRecord:
    """``ArrayRecord`` from a mapping of array-likes (an ArrayRecord is returned as is)."""
    if isinstance(arrays, ArrayRecord):
        return arrays
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


def client_metrics(**overrides: int | float) -> dict[str, int | float]:
    """A complete client train MetricRecord payload; keyword names use ``_`` for ``-``."""
    metrics: dict[str, int | float] = {
        "num-examples": 10,
        "train-loss": 1.0,
        "fp-residual": 0.1,
        "nfe-fwd": 12.0,
        "nfe-bwd": 8.0,
        "budget": 20.0,
        "tier": 0,
        "compute-s": 0.5,
        "compute-cpu-s": 0.5,
        "val-loss": 1.2,
        "local-steps": 3,
    }
    for key, value in overrides.items():
        metrics[key.replace("_", "-")] = value
    return metrics


def make_instruction(
    content: RecordDict | None = None,
    dst_node_id: int = 1,
    message_type: str = MessageType.TRAIN,
    *,
    server_round: int = 1,
    run_id: int = DEFAULT_RUN_ID,
) -> Message:
    """A server-to-node instruction Message with run identity and a message id."""
    with task_identity(run_id=run_id):
        message = Message(content or RecordDict(), dst_node_id, message_type, group_id=str(server_round))
    return assign_message_id(message)


def make_reply(
    node_id: int,
    arrays: ArrayRecord | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    *,
    message_type: str = MessageType.TRAIN,
    server_round: int = 1,
    extra_records: Mapping[str, ArrayRecord | MetricRecord] | None = None,
) -> Message:
    """A reply from ``node_id`` carrying ``{"arrays": ..., "metrics": ...}``."""
    instruction = make_instruction(None, node_id, message_type, server_round=server_round)
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = to_array_record(arrays)
    if metrics is not None:
        content["metrics"] = MetricRecord(dict(metrics))
    for key, record in (extra_records or {}).items():
        content[key] = record
    return assign_message_id(Message(content, reply_to=instruction))


def make_error_reply(
    node_id: int,
    reason: str = "client crashed",
    code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    *,
    message_type: str = MessageType.TRAIN,
    server_round: int = 1,
) -> Message:
    """An error reply from ``node_id``."""
    instruction = make_instruction(None, node_id, message_type, server_round=server_round)
    return assign_message_id(Message(Error(code=code, reason=reason), reply_to=instruction))


class LocalGrid(RunGrid):
    """In-process Grid dispatching each message to a Python function per node id.

    Clients get a deep copy of the instruction (as if it had been serialised) and return the
    reply content (``RecordDict``), an ``Error``, or a full reply ``Message``.  Exceptions become
    error replies.  Replies are available immediately; ``sent`` keeps every pushed instruction.
    """

    def __init__(self, clients: Mapping[int, ClientFn], run_id: int = DEFAULT_RUN_ID) -> None:
        super().__init__(run_id)
        self.clients: dict[int, ClientFn] = dict(clients)
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        """Node ids of the registered clients."""
        return list(self.clients)

    def _dispatch(self, message: Message) -> Message:
        handler = self.clients.get(message.metadata.dst_node_id)
        out: RecordDict | Error | Message
        if handler is None:
            node = message.metadata.dst_node_id
            out = Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"unknown node {node}")
        else:
            try:
                out = handler(copy.deepcopy(message))
            except Exception as err:  # noqa: BLE001 - a crashing client becomes an error reply
                out = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}")
        reply = out if isinstance(out, Message) else Message(out, reply_to=message)
        return assign_message_id(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Assign ids, run the clients, and store their replies."""
        ids: list[str] = []
        for message in messages:
            assign_message_id(message)
            self.sent.append(message)
            self._replies[message.metadata.message_id] = self._dispatch(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the replies to ``message_ids``."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and return all replies (clients answer synchronously)."""
        return list(self.pull_messages(list(self.push_messages(messages))))


def run_local(
    strategy: Strategy,
    clients: Mapping[int, ClientFn],
    initial_arrays: ArrayRecord | Mapping[str, Any],
    num_rounds: int = 2,
    **start_kwargs: Any,
) -> tuple[Result, LocalGrid]:
    """Run ``strategy.start`` on a fresh :class:`LocalGrid` with a task identity set."""
    grid = LocalGrid(clients)
    with task_identity(run_id=grid.run.run_id):
        result = strategy.start(
            grid=grid, initial_arrays=to_array_record(initial_arrays), num_rounds=num_rounds, **start_kwargs
        )
    return result, grid
