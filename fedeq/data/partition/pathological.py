"""``pathological``: each partition holds ``data.labels_per_client`` classes (``PathologicalPartitioner``).

Classes are given to partitions as ``data.class_assignment`` says (Flower Datasets' modes ``random``,
``deterministic`` or ``first-deterministic``), seeded by the run seed; each class is divided among the
partitions that hold it. ``shards`` is the seeded first-deterministic variant kept for older configs.
"""

from __future__ import annotations

import typing

import numpy as np

from fedeq.config.data import ClassAssignment
from fedeq.config.errors import ConfigError
from fedeq.data.partition.base import PartitionScheme, PartitionTask
from fedeq.data.partition.flower import run_pathological
from fedeq.registry import PARTITIONERS

__all__ = ["CLASS_ASSIGNMENTS", "Pathological"]

CLASS_ASSIGNMENTS: tuple[str, ...] = typing.get_args(ClassAssignment)
"""The values of ``data.class_assignment``."""


@PARTITIONERS.register("pathological")
class Pathological(PartitionScheme):
    """Label skew: ``labels_per_client`` classes per partition, assigned by ``class_assignment``."""

    option_keys = ("class_assignment",)

    def split(self, task: PartitionTask) -> list[np.ndarray]:
        k = int(task.labels_per_client)
        num_classes = int(np.unique(task.labels).size)
        if not 1 <= k <= num_classes:
            allowed = f"an integer in [1, {num_classes}]"
            raise ConfigError("data.labels_per_client", "out of range", allowed, k)
        mode = task.options.get("class_assignment") or "random"
        if mode not in CLASS_ASSIGNMENTS:
            raise ConfigError("data.class_assignment", "unknown value", " | ".join(CLASS_ASSIGNMENTS), mode)
        return run_pathological(task.order, task.labels, task.num_partitions, k, mode, task.seed)
