"""``shards``: pathological partitions of ``labels_per_client`` classes each (``PathologicalPartitioner``)."""

from __future__ import annotations

import numpy as np

from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_pathological
from fedeq.registry import PARTITIONERS

__all__ = ["Shards"]


@PARTITIONERS.register("shards")
class Shards(PartitionScheme):
    """Each partition holds ``labels_per_client`` classes, assigned first-deterministically after a
    seeded relabelling of the classes."""

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        k = int(task.labels_per_client)
        classes = np.unique(task.labels)
        if not 1 <= k <= classes.size:
            raise ValueError(
                f"data.labels_per_client: must be in [1, {classes.size}], got {task.labels_per_client}"
            )
        # A seeded relabelling makes the (first-deterministic) class assignment depend on the seed
        # while still using every class whenever num_partitions >= num_classes.
        relabel = task.rng.permutation(classes.size)
        partition_labels = relabel[np.searchsorted(classes, task.labels)]
        return run_pathological(
            task.order, partition_labels, task.num_partitions, k, "first-deterministic", task.seed
        )
