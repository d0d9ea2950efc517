"""Partitioning a dataset's examples across clients by scheme name (``data.partition``).

A partitioner module registers a :class:`PartitionScheme` subclass in ``PARTITIONERS``::

    @PARTITIONERS.register("my_scheme")
    class MyScheme(PartitionScheme):
        def split(self, task):
            return [np.sort(part) for part in np.array_split(task.order, task.num_partitions)]

:func:`partition_indices` checks the arguments every scheme shares, draws the seeded row order and hands
the scheme a :class:`PartitionTask`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedeq.registry import PARTITIONERS

__all__ = ["PartitionScheme", "PartitionTask", "partition_indices"]


@dataclass(frozen=True, eq=False)
class PartitionTask:
    """What a scheme splits: the examples as rows in a seeded order, and the options of ``data``."""

    order: np.ndarray
    """Example index of each row: a permutation of ``0..n-1`` drawn from ``rng``."""
    labels: np.ndarray
    """Class label of each row (the dataset's labels in the order of ``order``)."""
    num_partitions: int
    seed: int
    rng: np.random.Generator
    """The generator that drew ``order``; a scheme that needs more randomness draws it from here."""
    alpha: float
    labels_per_client: int
    min_partition_size: int
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Further per-example values of the dataset (say, a writer id), in the order of ``order``."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The values of the scheme's ``option_keys`` (``None`` where not set)."""


class PartitionScheme(ABC):
    """A way of splitting examples into partitions (one per client)."""

    option_keys: ClassVar[tuple[str, ...]] = ()
    """Further ``data.*`` keys the scheme reads (``partition_by``, ``shard_size``, ...), found in
    ``task.options``."""

    @abstractmethod
    def split(self, task: PartitionTask) -> list[np.ndarray]:
        """``task.num_partitions`` disjoint, sorted int64 arrays of example indices (values of
        ``task.order``), deterministic for ``task.seed``; ``ValueError`` naming the config key for
        options the scheme cannot honour."""


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int = 2,
    columns: Mapping[str, np.ndarray] | None = None,
    **options: Any,
) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` into ``num_partitions`` disjoint, sorted int64 arrays.

    Schemes: ``iid`` (equal random shards), ``dirichlet`` (per-class Dirichlet(alpha) proportions, every
    partition gets at least ``min_partition_size`` examples), ``shards`` (pathological: each partition
    holds ``labels_per_client`` classes) and any registered one. Deterministic for a given ``seed``.
    ``columns`` are further per-example values (``natural`` splits by one of them); ``options`` are the
    ``data.*`` keys of the scheme's ``option_keys`` (others are ignored).
    """
    labels = np.asarray(labels).reshape(-1)
    n = int(labels.shape[0])
    num_partitions = int(num_partitions)
    scheme = str(scheme).strip().lower()
    if scheme not in PARTITIONERS:
        raise ValueError(
            f"data.partition: unknown scheme '{scheme}'; allowed: {', '.join(PARTITIONERS.names())}"
        )
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions: must be in [1, {n}] (the number of examples), got {num_partitions}"
        )
    cls = PARTITIONERS.get(scheme)
    # Rows are stored in a seeded order so that every scheme (IidPartitioner has no seed) depends on it.
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    task = PartitionTask(
        order=order,
        labels=labels[order],
        num_partitions=num_partitions,
        seed=seed,
        rng=rng,
        alpha=alpha,
        labels_per_client=labels_per_client,
        min_partition_size=min_partition_size,
        columns={k: np.asarray(v)[order] for k, v in (columns or {}).items()},
        options={k: options.get(k) for k in getattr(cls, "option_keys", ())},
    )
    return cls().split(task)
