"""``exponential``: quantity skew, partition i (from 1) gets a share of the examples proportional to e^i."""

from __future__ import annotations

import numpy as np

from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_partitioner
from fedeq.registry import PARTITIONERS

__all__ = ["Exponential"]


@PARTITIONERS.register("exponential")
class Exponential(PartitionScheme):
    """Seeded rows dealt in contiguous runs whose sizes grow with the partition id; every partition must
    get at least one example (else Flower Datasets refuses, and validation reports ``data.partition``)."""

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        from flwr_datasets.partitioner import ExponentialPartitioner

        partitioner = ExponentialPartitioner(num_partitions=task.num_partitions)
        return run_partitioner(partitioner, task.order, task.labels)
