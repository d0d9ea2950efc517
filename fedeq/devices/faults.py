"""Fault injection for clients: raise, hang, or reply with NaN weights (seeded per call)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Error, Message
from flwr.common.constant import ErrorCode

from fedeq.arrays import from_numpy

FAULT_KINDS = ("raise", "hang", "nan")


class InjectedFault(RuntimeError):
    """The error an injected ``raise`` fault throws."""


def draw_fault(faults: Any, seed: int) -> str | None:
    """Draw ``raise``, ``hang`` or ``nan`` with probabilities ``raise_p``, ``hang_p``, ``nan_p`` (else None).

    One uniform draw from ``seed`` decides, so the same run seed, round and partition give the same fault.
    """
    u = float(np.random.default_rng(seed).random())
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += float(getattr(faults, f"{kind}_p"))
        if u < edge:
            return kind
    return None


def before_training(kind: str | None, faults: Any) -> None:
    """Apply a fault that happens before any work: raise, or hang for ``faults.hang_s`` seconds."""
    if kind == "raise":
        raise InjectedFault("injected fault: client raised")
    if kind == "hang":
        time.sleep(float(faults.hang_s))


def poison(arrays: ArrayRecord) -> ArrayRecord:
    """A copy of ``arrays`` whose first floating-point array is all NaN (a broken update the server must
    reject); the other arrays are shared."""
    out = ArrayRecord(dict(arrays.items()))
    for key, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if dtype.kind == "f":
            out[key] = from_numpy(np.full(tuple(array.shape), np.nan, dtype=dtype))
            break
    return out


def exception_reply(message: Message, err: BaseException) -> Message:
    """The error reply of a client call that raised ``err``."""
    return Message(
        Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=message
    )


def timeout_reply(message: Message, limit_s: float) -> Message:
    """The error reply of a client call that gave no reply within ``limit_s`` wall-clock seconds."""
    reason = f"timeout: no reply within call_timeout_s={limit_s:g}"
    return Message(Error(ErrorCode.CLIENT_APP_CRASHED, reason), reply_to=message)
