"""What every fedeq ``Grid`` shares: the run it operates in, instruction messages, message ids.

A grid subclasses :class:`RunGrid` and adds the node ids and the delivery of messages (``get_node_ids``,
``push_messages``, ``pull_messages``, ``send_and_receive``).
"""

from __future__ import annotations

from uuid import uuid4

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["RunGrid", "assign_message_id"]


def assign_message_id(message: Message) -> Message:
    """Give ``message`` a unique id, as the SuperLink/in-memory grid does on push."""
    message.metadata.__dict__["_message_id"] = str(uuid4())
    return message


class RunGrid(Grid):
    """A ``Grid`` holding its :class:`~flwr.supercore.run.Run` (an empty one of ``run_id`` until set)."""

    def __init__(self, run_id: int) -> None:
        self._run = Run.create_empty(run_id)

    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction Message."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
