"""A client's personal state: named tensors kept in the node's ``Context.state`` between rounds.

On fedeq's Ray engine the engine keeps each node's state and checkpoints it with the run; on Flower's engine
and in deployments it is the SuperNode's own ``context.state``. It never goes into a message.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict
from torch import Tensor

from fedeq.arrays import record_from_state_dict, record_to_state_dict

__all__ = ["PERSONAL_PREFIX", "PersonalState"]

PERSONAL_PREFIX = "personal/"
"""Prefix of the ``context.state`` records this module owns."""


class PersonalState:
    """Named tensor dicts (``head``, ``dual``, ``model``) in a node's ``RecordDict`` state."""

    def __init__(self, record: RecordDict) -> None:
        self.record = record

    def get(self, name: str) -> dict[str, Tensor] | None:
        """The tensors stored as ``name`` (``None`` before the first store)."""
        arrays = self.record.array_records.get(PERSONAL_PREFIX + name)
        return None if arrays is None else record_to_state_dict(arrays)

    def put(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Store ``tensors`` as ``name`` (replacing what was there)."""
        self.record[PERSONAL_PREFIX + name] = record_from_state_dict(tensors)

    def names(self) -> list[str]:
        """The names stored so far."""
        return [k[len(PERSONAL_PREFIX) :] for k in self.record if k.startswith(PERSONAL_PREFIX)]

    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(
            r.count_bytes()
            for k, r in self.record.items()
            if k.startswith(PERSONAL_PREFIX)
            if isinstance(r, ArrayRecord)
        )
