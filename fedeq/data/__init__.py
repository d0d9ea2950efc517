"""Datasets, federated partitioning and lightweight batching.

- :mod:`~fedeq.data.base`: :func:`load_dataset` by name (seeded test split, per-process cache);
- :mod:`~fedeq.data.datasets`: one module per dataset, registered in :data:`fedeq.registry.DATASETS`;
- :mod:`~fedeq.data.partition`: one module per scheme, registered in :data:`fedeq.registry.PARTITIONERS`;
- :mod:`~fedeq.data.clients`: a client's partition and validation split, tensors and batches.

Importing this package is light: scikit-learn, ``datasets`` and Flower Datasets are imported only where a
dataset is split or partitioned.
"""

from fedeq.data.base import DatasetSplits, load_dataset
from fedeq.data.clients import (
    ClientData,
    batches,
    client_dataset,
    client_partitions,
    install_partitions,
    load_client_data,
    partition_dataset,
    partition_sizes,
    to_tensors,
    uninstall_partitions,
)
from fedeq.data.datasets.base import DatasetSource, LabelledImages
from fedeq.data.partition.base import PartitionScheme, PartitionTask, partition_indices

__all__ = [
    "ClientData",
    "DatasetSource",
    "DatasetSplits",
    "LabelledImages",
    "PartitionScheme",
    "PartitionTask",
    "batches",
    "client_dataset",
    "client_partitions",
    "install_partitions",
    "load_client_data",
    "load_dataset",
    "partition_dataset",
    "partition_indices",
    "partition_sizes",
    "to_tensors",
    "uninstall_partitions",
]
