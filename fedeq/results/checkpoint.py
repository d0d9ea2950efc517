"""Per-round checkpoints: everything needed to continue a run bit-identically.

A checkpoint holds the round, the global arrays, the strategy's state (its attributes, e.g. FedAdam's
moments and the reply log), the RNG states of Python, NumPy and torch, and the results recorded so far. It is
written after every round, once its central evaluation is recorded, in two files:

- ``checkpoint.journal``: what only grows during a run (the strategy's reply logs, the recorder's rows),
  appended as one record per round holding that round's new items, so a round's checkpoint costs the same
  at round 1,000 as at round 1 (rewriting whole logs made it grow with the round number);
- ``checkpoint.pkl``: the rest, with the length of every journaled list, replaced atomically (temporary
  file + rename) after the round's journal record is on disk.

A crash between the two leaves a journal record the checkpoint does not know about; loading drops it (and a
record cut short by the crash), so the run resumes from the last complete checkpoint.
"""

from __future__ import annotations

import io
import os
import pickle
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy

CHECKPOINT_FILE = "checkpoint.pkl"
JOURNAL_FILE = "checkpoint.journal"
CHECKPOINT_KEYS = frozenset({"round", "arrays", "strategy", "recorder", "cum_sim", "rng"})
"""What every ``checkpoint.pkl`` holds (``journal``, the journaled lists' lengths, since the journal)."""


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``out_dir/checkpoint.pkl`` atomically."""
    path = Path(out_dir) / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path, *, truncate: bool = True) -> dict[str, Any]:
    """The last complete checkpoint of ``out_dir``; ``state["journal"]`` holds the journaled lists whole.

    Raises ``FileNotFoundError`` without ``checkpoint.pkl`` and ``ValueError`` for a file that is not a
    fedeq checkpoint or a journal that does not match it. ``truncate=False`` leaves the journal file as it
    is (to check a checkpoint without changing anything).
    """
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no {CHECKPOINT_FILE} in {out_dir} (was the run started by fedeq?)"
        )
    try:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ValueError(
            f"--resume: {path} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    missing = CHECKPOINT_KEYS - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"--resume: {path} is not a fedeq checkpoint (missing {sorted(missing)})")
    if "journal" in state:
        state["journal"] = Journal(out_dir).load(state["round"], state["journal"], truncate=truncate)
    return state


def checkpoint_round(out_dir: str | Path) -> int | None:
    """The round of the last checkpoint in ``out_dir`` (``None`` without a readable one); the journal is
    not read."""
    try:
        with open(Path(out_dir) / CHECKPOINT_FILE, "rb") as fh:
            return int(pickle.load(fh)["round"])
    except Exception:  # noqa: BLE001 - missing, unreadable or foreign: no checkpoint to continue from
        return None


class Journal:
    """Append-only storage of lists that only grow during a run, one record per round.

    :meth:`take` returns what each list gained since the last call; :meth:`append` writes a round's record
    (flushed and synced); :meth:`load` rebuilds the lists as they were at a checkpoint's round.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / JOURNAL_FILE
        self.lengths: dict[str, int] = {}

    def take(self, lists: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        """The items appended to each named list since the last :meth:`take` (a new list each)."""
        tails = {}
        for name, items in lists.items():
            start = self.lengths.get(name, 0)
            if len(items) < start:
                raise RuntimeError(f"journaled list {name!r} shrank from {start} to {len(items)} items")
            tails[name] = list(items[start:])
            self.lengths[name] = len(items)
        return tails

    def append(self, server_round: int, tails: Mapping[str, Sequence[Any]]) -> None:
        with open(self.path, "ab") as fh:
            pickle.dump((int(server_round), dict(tails)), fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())

    def load(
        self, server_round: int, lengths: Mapping[str, int], truncate: bool = True
    ) -> dict[str, list[Any]]:
        """The lists as of ``server_round``, checked against the checkpoint's ``lengths``.

        Records of later rounds and a record cut short are dropped from the file (unless ``truncate`` is
        false), so that appending goes on from ``server_round``.
        """
        lists: dict[str, list[Any]] = {name: [] for name in lengths}
        end = 0
        data = self.path.read_bytes() if self.path.is_file() else b""
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            try:
                rnd, tails = pickle.load(stream)
            except Exception:  # noqa: BLE001 - a record cut short by a crash
                break
            if rnd > server_round:
                break
            for name, items in tails.items():
                lists.setdefault(name, []).extend(items)
            end = stream.tell()
        got = {name: len(lists.get(name, ())) for name in lengths}
        if got != dict(lengths):
            raise ValueError(
                f"--resume: {self.path} does not match {CHECKPOINT_FILE} (round {server_round}): "
                f"items per list {got}, expected {dict(lengths)}"
            )
        if truncate and end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        self.lengths = dict(lengths)
        return lists


TRANSIENT_ATTRIBUTES = ("reply_checks",)
"""Strategy attributes rebuilt from the config on resume rather than stored (they hold closures)."""

JOURNALED_ATTRIBUTES = ("client_log", "eval_client_log")
"""Strategy attributes that only grow (the reply guard's logs): stored in the journal, not the snapshot."""

WRAPPED_ATTRIBUTE = "strategy"
"""Where a wrapper strategy (the reply guard, Flower's DP wrappers) holds the strategy it wraps; the wrapped
strategy's state is stored nested under this name."""


def _wrapped(strategy: Any) -> Strategy | None:
    inner = vars(strategy).get(WRAPPED_ATTRIBUTE)
    return inner if isinstance(inner, Strategy) else None


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's attributes (picklable for Flower's built-in strategies), minus transient and
    journaled ones; a wrapped strategy's attributes nested the same way."""
    skip = (*TRANSIENT_ATTRIBUTES, *JOURNALED_ATTRIBUTES)
    state = {k: v for k, v in vars(strategy).items() if k not in skip}
    inner = _wrapped(strategy)
    if inner is not None:
        state[WRAPPED_ATTRIBUTE] = strategy_state(inner)
    return state


def journaled_lists(strategy: Any) -> dict[str, list[Any]]:
    """The strategy's :data:`JOURNALED_ATTRIBUTES` it has, by name."""
    lists = {k: getattr(strategy, k, None) for k in JOURNALED_ATTRIBUTES}
    return {k: v for k, v in lists.items() if isinstance(v, list)}


def snapshot_strategy(strategy: Any) -> bytes:
    """:func:`strategy_state` pickled now, so later changes to the strategy do not reach the snapshot."""
    return pickle.dumps(strategy_state(strategy), protocol=pickle.HIGHEST_PROTOCOL)


def restore_strategy(strategy: Any, state: Mapping[str, Any] | bytes) -> None:
    """Put back a :func:`strategy_state` (or its :func:`snapshot_strategy` bytes), in place.

    A snapshot without a nested state for a wrapped strategy (written when the reply guard was mixed into
    the strategy class) is one flat dict: the attributes the wrapped strategy has go to it.
    """
    state = dict(pickle.loads(state) if isinstance(state, bytes) else state)
    inner = _wrapped(strategy)
    if inner is not None:
        inner_state = state.pop(WRAPPED_ATTRIBUTE, None)
        if not isinstance(inner_state, Mapping):
            inner_state = {k: state.pop(k) for k in list(state) if k in vars(inner)}
        restore_strategy(inner, inner_state)
    vars(strategy).update(state)
