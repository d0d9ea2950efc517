"""Partitioners (registered in :data:`fedeq.registry.PARTITIONERS`): one module per scheme.

Importing this package registers the built-ins, in this order: ``iid``, ``dirichlet``, ``shards``,
``pathological``, ``shard``, ``natural``, ``linear``, ``square``, ``exponential``. They run Flower
Datasets partitioners (:mod:`~fedeq.data.partition.flower`), imported when a dataset is partitioned, so
a process that is handed its partitions never loads Flower Datasets.
"""

from fedeq.data.partition import iid as _iid  # noqa: I001  (import order = registration order)
from fedeq.data.partition import dirichlet as _dirichlet
from fedeq.data.partition import shards as _shards
from fedeq.data.partition import pathological as _pathological
from fedeq.data.partition import shard as _shard
from fedeq.data.partition import natural as _natural
from fedeq.data.partition import linear as _linear
from fedeq.data.partition import square as _square
from fedeq.data.partition import exponential as _exponential
from fedeq.data.partition.base import PartitionScheme, PartitionTask, partition_indices

__all__ = ["PartitionScheme", "PartitionTask", "partition_indices"]

del _iid, _dirichlet, _shards, _pathological, _shard, _natural, _linear, _square, _exponential
