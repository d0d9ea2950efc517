"""``natural``: one partition per distinct value of a column (``NaturalIdPartitioner``), as real federations
are split: by writer, speaker or device.

The column is ``data.partition_by``; the dataset must provide it (``data.name=hf`` keeps that column of
its source). The number of partitions is the number of distinct values in the training split, and must
equal ``num_clients``.
"""

from __future__ import annotations

import numpy as np

from fedeq.config.errors import ConfigError
from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_partitioner
from fedeq.registry import PARTITIONERS

__all__ = ["Natural"]


@PARTITIONERS.register("natural")
class Natural(PartitionScheme):
    """Partition ``i`` holds the examples of the ``i``-th distinct value (sorted) of ``data.partition_by``."""

    option_keys = ("partition_by",)

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        from flwr_datasets.partitioner import NaturalIdPartitioner

        column = task.options.get("partition_by")
        if not column:
            raise ConfigError(
                "data.partition_by", "data.partition=natural needs a column", "a column name", column
            )
        if column not in task.columns:
            available = ", ".join(sorted(task.columns)) or "none"
            raise ConfigError(
                "data.partition_by",
                "the dataset has no such column to partition by",
                f"a column the dataset keeps (here: {available})",
                column,
            )
        ids = task.columns[column]
        found = int(np.unique(ids).shape[0])
        if found != task.num_partitions:
            raise ConfigError(
                "num_clients",
                f"data.partition=natural by '{column}' gives {found} partitions (distinct values in the "
                "training split), one per client",
                f"num_clients={found}",
                task.num_partitions,
            )
        return run_partitioner(NaturalIdPartitioner(partition_by="label"), task.order, ids)
