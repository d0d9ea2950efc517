"""``dirichlet``: per-class Dirichlet(alpha) proportions (``DirichletPartitioner``), with a minimum size.

Every partition gets at least ``min_partition_size`` examples: by Flower's own resampling when one of its
attempts meets the minimum, else by topping up the small partitions of its first attempt.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_partitioner
from fedeq.registry import PARTITIONERS

__all__ = ["DIRICHLET_ATTEMPTS", "Dirichlet", "dirichlet_first_fit", "dirichlet_partitions", "top_up"]

DIRICHLET_ATTEMPTS = 11
"""How many times ``DirichletPartitioner`` samples before it gives up (``sampling_try`` 0..10)."""


@PARTITIONERS.register("dirichlet")
class Dirichlet(PartitionScheme):
    """Label skew controlled by ``alpha`` (small: few classes per partition) and ``min_partition_size``."""

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        if not float(task.alpha) > 0.0:
            raise ValueError(f"data.alpha: must be > 0, got {task.alpha}")
        min_size = max(0, int(task.min_partition_size))
        n, num_partitions = int(task.order.shape[0]), task.num_partitions
        if num_partitions * min_size > n:
            raise ValueError(
                f"data.partition: cannot give {num_partitions} partitions at least {min_size} examples "
                f"each from {n} examples"
            )
        return dirichlet_partitions(
            task.order, task.labels, num_partitions, float(task.alpha), task.seed, min_size
        )


def dirichlet_first_fit(
    partition_labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int
) -> tuple[int | None, np.ndarray]:
    """Which of ``DirichletPartitioner``'s attempts first gives every partition ``min_size`` examples.

    Returns ``(attempt or None, partition sizes of attempt 0)``. It replays the partitioner's sampling
    (``shuffle=False, self_balancing=False``) on sizes only: per attempt and per class, in sorted class
    order, one ``rng.dirichlet`` draw from the partitioner's seeded generator, the split points
    ``(cumsum(p) * n_k).astype(int)`` and the slice lengths ``np.split`` gives — milliseconds where each
    failed attempt of the partitioner itself takes ~1 s at 10,000 partitions (its warning finds the
    smallest partitions in quadratic time).
    """
    rng = np.random.default_rng(seed)
    alphas = np.array([alpha], dtype=float).repeat(num_partitions)
    counts = np.unique(partition_labels, return_counts=True)[1].tolist()  # per class, in sorted order
    first_sizes = np.zeros(num_partitions, dtype=np.int64)
    for attempt in range(DIRICHLET_ATTEMPTS):
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for n_k in counts:
            cuts = (np.cumsum(rng.dirichlet(alphas)) * n_k).astype(int)[:-1]
            bounds = np.clip(np.concatenate(([0], cuts, [n_k])), 0, n_k)
            sizes += np.maximum(np.diff(bounds), 0)
        if attempt == 0:
            first_sizes = sizes
        if int(sizes.min()) >= min_size:
            return attempt, first_sizes
    return None, first_sizes


def dirichlet_partitions(
    order: np.ndarray,
    partition_labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int,
) -> list[np.ndarray]:
    """Dirichlet partitioning; if Flower's resampling cannot meet ``min_size``, top up small partitions.

    That is: ``DirichletPartitioner(min_partition_size=min_size)``'s partitions when one of its attempts
    meets ``min_size``; else those of its first attempt (``min_partition_size=0``) with small partitions
    topped up from the largest. When :func:`dirichlet_first_fit` finds that no attempt will meet
    ``min_size`` (the rule at thousands of partitions of a few examples each), the doomed attempts are
    skipped — after checking that the replayed sizes of attempt 0 are the partitioner's own.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    def partitioner(min_partition_size: int) -> DirichletPartitioner:
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=False,
            seed=seed,
        )

    parts: list[np.ndarray] | None = None
    if min_size > 0:
        fit, first_sizes = dirichlet_first_fit(partition_labels, num_partitions, alpha, seed, min_size)
        if fit is None:
            first = run_partitioner(partitioner(0), order, partition_labels)
            if np.array_equal([p.shape[0] for p in first], first_sizes):
                parts = first
    if parts is None:
        try:
            return run_partitioner(partitioner(min_size), order, partition_labels)
        except ValueError as exc:
            if "max number of attempts" not in str(exc):
                raise
        parts = run_partitioner(partitioner(0), order, partition_labels)
    return top_up(parts, num_partitions, seed, min_size)


def top_up(parts_in: Sequence[np.ndarray], num_partitions: int, seed: int, min_size: int) -> list[np.ndarray]:
    """Give every partition ``min_size`` examples, moving random ones from the largest partition."""
    parts = [list(p) for p in parts_in]
    rng = np.random.default_rng([seed, 1])
    # Move random examples from the largest partition (max-heap with lazy updates); it always exceeds
    # min_size while some partition is below it, because n >= num_partitions * min_size.
    heap = [(-len(p), j) for j, p in enumerate(parts)]
    heapq.heapify(heap)
    for pid in range(num_partitions):
        while len(parts[pid]) < min_size:
            neg_size, donor = heapq.heappop(heap)
            if -neg_size != len(parts[donor]):  # stale entry; a fresh one was pushed later
                continue
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[pid].append(taken)
            heapq.heappush(heap, (-len(parts[donor]), donor))
            heapq.heappush(heap, (-len(parts[pid]), pid))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
