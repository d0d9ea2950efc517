"""Datasets, federated partitioning and lightweight batching.

- :mod:`~fedeq.data.base`: :func:`load_dataset` by name (seeded test split, per-process cache);
- :mod:`~fedeq.data.datasets`: one module per dataset, registered in :data:`fedeq.registry.DATASETS`;
- :mod:`~fedeq.data.partition`: one module per scheme, registered in :data:`fedeq.registry.PARTITIONERS`;
- :mod:`~fedeq.data.clients`: a client's partition and validation split, tensors and batches;
- :mod:`~fedeq.data.server_split`: the server's validation split, carved out before partitioning;
- :mod:`~fedeq.data.checks`: :func:`check_data`, the data checks a run passes before any work.

Your own dataset is a :class:`DatasetSource` registered with :func:`register_dataset` (see
``docs/custom_data.md``).

Importing this package is light: scikit-learn, ``datasets`` and Flower Datasets are imported only where a
dataset is split or partitioned.
"""

from fedeq.data.base import DatasetSplits, load_dataset
from fedeq.data.checks import DataReport, check_data
from fedeq.data.clients import (
    ClientData,
    batches,
    client_dataset,
    client_partitions,
    install_partitions,
    load_client_data,
    partition_dataset,
    partition_sizes,
    server_validation,
    to_tensors,
    uninstall_partitions,
)
from fedeq.data.datasets.base import DatasetSource, LabelledImages, register_dataset
from fedeq.data.partition.base import PartitionScheme, PartitionTask, partition_indices

__all__ = [
    "ClientData",
    "DataReport",
    "DatasetSource",
    "DatasetSplits",
    "LabelledImages",
    "PartitionScheme",
    "PartitionTask",
    "batches",
    "check_data",
    "client_dataset",
    "client_partitions",
    "install_partitions",
    "load_client_data",
    "load_dataset",
    "partition_dataset",
    "partition_indices",
    "partition_sizes",
    "register_dataset",
    "server_validation",
    "to_tensors",
    "uninstall_partitions",
]
