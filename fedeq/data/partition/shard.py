"""``shard``: sort by label, cut into shards, deal shards to partitions (``ShardPartitioner``), the
non-IID split of the FedAvg paper.

Options: ``data.num_shards_per_partition`` and ``data.shard_size`` (either, both or neither: Flower
Datasets derives what is not given from the dataset's size).
"""

from __future__ import annotations

import numpy as np

from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_partitioner
from fedeq.registry import PARTITIONERS

__all__ = ["Shard"]


@PARTITIONERS.register("shard")
class Shard(PartitionScheme):
    """Partitions of ``num_shards_per_partition`` label-sorted shards of ``shard_size`` examples each."""

    option_keys = ("num_shards_per_partition", "shard_size")

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        from flwr_datasets.partitioner import ShardPartitioner

        shards, size = task.options.get("num_shards_per_partition"), task.options.get("shard_size")
        partitioner = ShardPartitioner(
            num_partitions=task.num_partitions,
            partition_by="label",
            num_shards_per_partition=None if shards is None else int(shards),
            shard_size=None if size is None else int(size),
            shuffle=True,
            seed=task.seed,
        )
        return run_partitioner(partitioner, task.order, task.labels)
