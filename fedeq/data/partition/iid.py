"""``iid``: equal random shards (Flower Datasets' ``IidPartitioner`` over the seeded row order)."""

from __future__ import annotations

import numpy as np

from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_partitioner
from fedeq.registry import PARTITIONERS

__all__ = ["Iid"]


@PARTITIONERS.register("iid")
class Iid(PartitionScheme):
    """Contiguous shards of the seeded rows; the first ``n % num_partitions`` hold one example more."""

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        from flwr_datasets.partitioner import IidPartitioner

        partitioner = IidPartitioner(num_partitions=task.num_partitions)
        return run_partitioner(partitioner, task.order, task.labels)
