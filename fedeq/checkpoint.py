"""Per-round checkpoints: everything needed to continue a run bit-identically.

A checkpoint holds the round, the global arrays, the strategy's state (its attributes, e.g. FedAdam's
moments and the reply log), the RNG states of Python, NumPy and torch, and the results recorded so far. It is
written atomically (temporary file + rename) after every round, once its central evaluation is recorded.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pkl"


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


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no {CHECKPOINT_FILE} in {out_dir} (was the run started by fedeq?)"
        )
    with open(path, "rb") as fh:
        return pickle.load(fh)


TRANSIENT_ATTRIBUTES = ("reply_checks",)
"""Strategy attributes rebuilt from the config on resume rather than stored (they hold closures)."""


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's attributes (picklable for Flower's built-in strategies), minus transient ones."""
    return {k: v for k, v in vars(strategy).items() if k not in TRANSIENT_ATTRIBUTES}


def snapshot_strategy(strategy: Any) -> bytes:
    """:func:`strategy_state` pickled now, so later changes to the strategy do not reach the snapshot."""
    return pickle.dumps(strategy_state(strategy), protocol=pickle.HIGHEST_PROTOCOL)


def restore_strategy(strategy: Any, state: dict[str, Any] | bytes) -> None:
    """Put back a :func:`strategy_state` (or its :func:`snapshot_strategy` bytes)."""
    if isinstance(state, bytes):
        state = pickle.loads(state)
    vars(strategy).update(state)
