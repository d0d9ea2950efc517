"""The ``data`` section of the configuration: the dataset, where it comes from, and its partition.

Names (``name``, ``partition``) are checked against :mod:`fedeq.registry`; the data itself (files,
columns, labels, partition sizes) is checked before any work by :func:`fedeq.data.check_data`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from fedeq.config.rules import Float, Int, Section, problem, registered_name
from fedeq.registry import DATASETS, PARTITIONERS

__all__ = ["ClassAssignment", "DataConfig"]

ClassAssignment = Literal["random", "deterministic", "first-deterministic"]

Name = Annotated[str, StringConstraints(min_length=1)]
"""A non-empty column, split or source name."""


class DataConfig(Section):
    """Data set and its partition over clients."""

    name: registered_name(DATASETS) = "digits"  # type: ignore[valid-type]
    """A registered data set: ``digits``, ``mnist5k``, ``npz``, ``hf`` or one a plugin registers."""
    path: str | None = None
    """npz: the ``.npz`` file of the examples."""
    test_path: str | None = None
    """npz: a ``.npz`` file of test examples (null: ``test_fraction`` of ``path``)."""
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    """Share of the examples held out for testing when the source has no test split of its own."""
    val_fraction: Float = Field(0.1, ge=0, lt=1)
    """Share of each client's examples kept for local validation."""
    client_test_fraction: Float = Field(0.0, ge=0, lt=0.9)
    """Share of each client's examples held out as its own test split (0: none); personalised methods
    (``personalization.method``) report every client's accuracy on it."""
    server_val_fraction: Float = Field(0.0, ge=0, lt=0.5)
    """Share of the training split held by the server as its validation split (0: none), carved out
    before partitioning and never given to a client; read by the ``server_val`` quality function."""
    partition: registered_name(PARTITIONERS) = "dirichlet"  # type: ignore[valid-type]
    """How the examples are split over clients: a registered partitioner (``iid``, ``dirichlet``, ...)."""
    alpha: Float = Field(0.5, gt=0)
    """dirichlet: concentration of each client's label distribution (smaller: more skewed)."""
    labels_per_client: Int = Field(2, ge=1)
    """Label-skewed partitioners (shards, pathological): classes per client."""
    source: Name | None = None
    """hf: a Hugging Face Hub id (needs the internet), a directory saved with ``save_to_disk``, an image
    folder, or a ``.parquet`` / ``.csv`` file."""
    input_key: Name | list[Name] | None = None
    """hf: input column(s); null: the first of image, img, pixel_values, else every numeric column but
    the label and ``partition_by``."""
    label_key: Name | None = None
    """hf: label column; null: the first of label, labels, target."""
    train_split: Name = "train"
    """hf: the split to train on."""
    test_split: Name | None = None
    """hf: the split to test on; null: the source's ``test`` split, else ``test_fraction`` of the training
    split."""
    partition_by: Name | None = None
    """natural: the column whose distinct values are the clients (writer, speaker, device)."""
    class_assignment: ClassAssignment = "random"
    """pathological: how classes are given to partitions."""
    num_shards_per_partition: Int | None = Field(None, ge=1)
    """shard: shards per partition (null: derived from ``shard_size`` or the dataset's size)."""
    shard_size: Int | None = Field(None, ge=1)
    """shard: examples per shard (null: derived from ``num_shards_per_partition``)."""

    @model_validator(mode="after")
    def _required_keys(self) -> DataConfig:
        if self.name == "npz" and not self.path:
            allowed = "path to an .npz file"
            raise problem("data.name=npz requires a path", allowed, at=("path",), got=self.path)
        if self.name == "hf" and not self.source:
            allowed = "a Hub id, a save_to_disk directory, an image folder, or a .parquet/.csv file"
            raise problem("data.name=hf requires a source", allowed, at=("source",), got=self.source)
        if self.partition == "natural" and not self.partition_by:
            allowed = "the name of a column of the dataset (writer, speaker, device, ...)"
            raise problem("data.partition=natural requires a column", allowed, at=("partition_by",), got=None)
        if isinstance(self.input_key, list) and not self.input_key:
            raise problem("empty list", "null, a column name or a non-empty list of names", at=("input_key",))
        return self
