"""Running a Flower Datasets partitioner over fedeq's rows and reading all its partitions at once.

The rows handed to a partitioner are ``(label, index)``: ``index`` is the example index, so a partition
is read back as the sorted ``index`` column of its rows.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: worker processes that only train need neither (~150 MB, ~2 s)
    import datasets
    from flwr_datasets.partitioner import Partitioner

__all__ = ["computed_partitions", "loaded_partition", "run_partitioner", "run_pathological"]


def _make_dataset(order: np.ndarray, partition_labels: np.ndarray) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({"label": partition_labels, "index": order.astype(np.int64)})


def loaded_partition(partitioner: Partitioner, pid: int) -> np.ndarray:
    """Partition ``pid`` the ordinary way (``load_partition``): its sorted ``index`` column."""
    table = partitioner.load_partition(pid).with_format("arrow")[:]
    return np.sort(np.asarray(table["index"].to_numpy(), dtype=np.int64))


def computed_partitions(partitioner: Partitioner, order: np.ndarray) -> list[np.ndarray] | None:
    """Every partition at once from what ``partitioner`` computed, or None for an unknown partitioner.

    ``IidPartitioner`` takes contiguous shards (``Dataset.shard(..., contiguous=True)``: the first
    ``n % num_partitions`` shards hold one row more, as ``np.array_split``). The Dirichlet and pathological
    partitioners keep the rows of every partition in their private ``_partition_id_to_indices`` once
    ``_partition_id_to_indices_determined`` is set; Flower Datasets has no public way to read them but
    ``load_partition``, which builds a new Arrow dataset per call. Measured with flwr-datasets 0.6.1
    (40,000 rows, 4,000 partitions, 2 shared CPU cores): ``load_partition`` for every partition took
    12 s (pathological) to 24 s (Dirichlet), reading the dictionary 0.02 s. So the dictionary is read;
    ``pyproject.toml`` pins the tested flwr-datasets releases, :func:`run_partitioner` checks the result
    against ``load_partition`` on every call, and ``tests/test_partition_equivalence.py`` fails when the
    attribute disappears or changes meaning.
    """
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    num = partitioner.num_partitions
    index = order.astype(np.int64)
    if type(partitioner) is IidPartitioner:
        return [np.sort(shard) for shard in np.array_split(index, num)]
    rows = getattr(partitioner, "_partition_id_to_indices", None)
    # NaturalIdPartitioner has no flag: it fills the dictionary for every id on its first load_partition.
    natural = type(partitioner) is NaturalIdPartitioner
    determined = getattr(partitioner, "_partition_id_to_indices_determined", natural and bool(rows))
    if not determined or not isinstance(rows, dict):
        return None
    if sorted(rows) != list(range(num)):
        return None
    return [np.sort(index[np.asarray(rows[pid], dtype=np.int64)]) for pid in range(num)]


def run_partitioner(
    partitioner: Partitioner, order: np.ndarray, partition_labels: np.ndarray
) -> list[np.ndarray]:
    """All partitions of ``partitioner`` over rows ``(label, index)``: sorted arrays of ``order``'s values.

    The partitions are read at once (:func:`computed_partitions`) and checked against the first and the
    last partition loaded with ``load_partition``; if the check fails (say, a Flower Datasets release
    stores them differently), every partition is loaded with ``load_partition``, the slow way.
    """
    partitioner.dataset = _make_dataset(order, partition_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        num = partitioner.num_partitions
        probes = {pid: loaded_partition(partitioner, pid) for pid in (0, num - 1)}
        fast = computed_partitions(partitioner, order)
        if fast is not None and all(np.array_equal(fast[p], v) for p, v in probes.items()):
            return fast
        return [probes[pid] if pid in probes else loaded_partition(partitioner, pid) for pid in range(num)]


def run_pathological(
    order: np.ndarray, partition_labels: np.ndarray, num_partitions: int, k: int, mode: str, seed: int
) -> list[np.ndarray]:
    """:func:`run_partitioner` with ``PathologicalPartitioner``: ``k`` classes per partition, given out as
    ``mode`` (``class_assignment_mode``) says; rows are not shuffled."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=k,
        class_assignment_mode=mode,
        shuffle=False,
        seed=seed,
    )
    return run_partitioner(partitioner, order, partition_labels)
