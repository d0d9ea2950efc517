"""The server's validation split: a seeded, stratified share of the training split that no client gets.

It is carved out before partitioning (``data.server_val_fraction``), so the partitioner only sees the
remaining examples; the partitions stay index arrays into the full ``x_train``.
"""

from __future__ import annotations

import numpy as np

from fedeq.data.base import split_indices

__all__ = ["server_split_indices"]


def server_split_indices(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(server, clients)``: sorted int64 indices into ``y``, the server holding ``fraction`` of them.

    Stratified by label when feasible, seeded by ``seed``; ``fraction == 0`` gives no server example.
    Raises ``ValueError`` naming ``data.server_val_fraction`` unless ``0 <= fraction < 0.5``.
    """
    f = float(fraction)
    if not 0.0 <= f < 0.5:
        raise ValueError(f"data.server_val_fraction: must be in [0, 0.5), got {fraction}")
    n = int(np.asarray(y).shape[0])
    if f == 0.0:
        return np.zeros(0, dtype=np.int64), np.arange(n, dtype=np.int64)
    clients, server = split_indices(np.asarray(y), f, int(seed))
    return np.sort(server).astype(np.int64), np.sort(clients).astype(np.int64)
