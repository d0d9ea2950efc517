"""One client's view of the data: its partition, its local validation split, tensors and batches.

The training split of a dataset (:func:`fedeq.data.load_dataset`) is partitioned across clients
(:func:`fedeq.data.partition_indices`) once per process and cached. Engines with long-lived worker
processes load and partition once and install both in every worker (:func:`install_partitions`).
scikit-learn, ``datasets`` and Flower Datasets are imported only where a dataset is split or partitioned,
so a worker given both never loads them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedeq.data.base import (
    DatasetSplits,
    dataset_key,
    hashable_option,
    install_dataset,
    load_dataset,
    uninstall_datasets,
)
from fedeq.data.partition.base import partition_indices
from fedeq.data.server_split import server_split_indices
from fedeq.registry import DATASETS, PARTITIONERS, Registry

__all__ = [
    "ClientData",
    "batches",
    "client_dataset",
    "client_partitions",
    "install_partitions",
    "load_client_data",
    "partition_dataset",
    "partition_sizes",
    "server_validation",
    "to_tensors",
    "uninstall_partitions",
]


def partition_dataset(
    name: str,
    path: str | None,
    test_path: str | None,
    test_fraction: float,
    num_partitions: int,
    scheme: str,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int = 2,
    server_val_fraction: float = 0.0,
    **options: Any,
) -> tuple[np.ndarray, ...]:
    """Partition the training split of a dataset (see :func:`load_dataset`); cached per arguments.

    ``options`` are further ``data.*`` keys, each read by the dataset or by the scheme (``source=...``,
    ``partition_by="writer"``). Returns one read-only int64 index array (into ``x_train``) per partition.
    The server's validation split (``server_val_fraction`` of the examples, see
    :func:`~fedeq.data.server_split.server_split_indices`) is left out of every partition.
    """
    scheme_keys = _option_keys(PARTITIONERS, scheme)
    data_keys = _option_keys(DATASETS, name)
    unknown = sorted(set(options) - {*scheme_keys, *data_keys})
    if unknown:
        raise ValueError(f"data.{unknown[0]}: read by neither dataset '{name}' nor scheme '{scheme}'")
    data_options = {k: v for k, v in options.items() if k in data_keys}
    scheme_options = tuple((k, hashable_option(options.get(k))) for k in scheme_keys)
    splits = load_dataset(name, path, test_path, test_fraction, seed, **data_options)
    return _partition_cached(
        splits,
        int(num_partitions),
        str(scheme).strip().lower(),
        float(alpha),
        int(labels_per_client),
        int(seed),
        int(min_partition_size),
        scheme_options,
        float(server_val_fraction),
    )


def _option_keys(registry: Registry[Any], name: str) -> tuple[str, ...]:
    """The further ``data.*`` keys that the dataset or scheme registered as ``name`` reads."""
    return getattr(registry.get(str(name).strip().lower()), "option_keys", ())


@functools.lru_cache(maxsize=32)
def _partition_cached(
    splits: DatasetSplits,
    num_partitions: int,
    scheme: str,
    alpha: float,
    labels_per_client: int,
    seed: int,
    min_partition_size: int,
    scheme_options: tuple[tuple[str, Any], ...] = (),
    server_val_fraction: float = 0.0,
) -> tuple[np.ndarray, ...]:
    # ``splits`` is itself a cached object, so hashing it by identity keys on the dataset arguments.
    y, columns, pool = splits.y_train, splits.columns, None
    if server_val_fraction > 0:
        pool = server_split_indices(y, server_val_fraction, seed)[1]
        y, columns = y[pool], {k: v[pool] for k, v in columns.items()}
    parts = partition_indices(
        y,
        num_partitions,
        scheme,
        alpha=alpha,
        labels_per_client=labels_per_client,
        seed=seed,
        min_partition_size=min_partition_size,
        columns=columns,
        **dict(scheme_options),
    )
    if pool is not None:
        parts = [pool[p] for p in parts]
    for p in parts:
        p.flags.writeable = False
    return tuple(parts)


@dataclass
class ClientData:
    """One client's local train/validation arrays (and its own test split, empty unless
    ``data.client_test_fraction > 0``)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def num_train(self) -> int:
        """Number of local training examples."""
        return int(self.y_train.shape[0])

    @property
    def num_val(self) -> int:
        """Number of local validation examples."""
        return int(self.y_val.shape[0])


def _cfg(data_cfg: Any, key: str, default: Any = None) -> Any:
    """Attribute lookup that tolerates absent optional keys (dataclasses and OmegaConf configs)."""
    try:
        value = getattr(data_cfg, key)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def _cfg_options(data_cfg: Any) -> dict[str, Any]:
    """The further ``data.*`` keys that the configured dataset and scheme read, with their values."""
    keys = (*_option_keys(DATASETS, data_cfg.name), *_option_keys(PARTITIONERS, data_cfg.partition))
    return {k: hashable_option(_cfg(data_cfg, k)) for k in keys}


def _cfg_args(data_cfg: Any) -> tuple[Any, ...]:
    """``(name, path, test_path, test_fraction, scheme, alpha, labels_per_client, min_partition_size,
    server_val_fraction, options)`` with ``options`` the sorted ``(key, value)`` pairs of
    :func:`_cfg_options`."""
    path = _cfg(data_cfg, "path")
    test_path = _cfg(data_cfg, "test_path")
    return (
        str(data_cfg.name),
        str(path) if path else None,
        str(test_path) if test_path else None,
        float(_cfg(data_cfg, "test_fraction", 0.2)),
        str(data_cfg.partition),
        float(_cfg(data_cfg, "alpha", 0.5)),
        int(_cfg(data_cfg, "labels_per_client", 2)),
        int(_cfg(data_cfg, "min_partition_size", 2)),
        float(_cfg(data_cfg, "server_val_fraction", 0.0)),
        tuple(sorted(_cfg_options(data_cfg).items())),
    )


_INSTALLED_PARTITIONS: dict[tuple[Any, ...], tuple[np.ndarray, ...]] = {}
"""Partitions handed to this process by :func:`install_partitions`, keyed by :func:`_partitions_key`."""


def _partitions_key(args: tuple[Any, ...], num_partitions: int, seed: int) -> tuple[Any, ...]:
    """Key of :data:`_INSTALLED_PARTITIONS`: :func:`_cfg_args`, ``num_partitions`` and ``seed``."""
    return (*args, int(num_partitions), int(seed))


def _cfg_partitions(
    data_cfg: Any, num_partitions: int, seed: int
) -> tuple[DatasetSplits, tuple[np.ndarray, ...]]:
    args = _cfg_args(data_cfg)
    name, path, test_path, test_fraction, scheme, alpha, labels_per_client, min_size, server_f, options = args
    splits = client_dataset(data_cfg, seed)
    installed = _INSTALLED_PARTITIONS.get(_partitions_key(args, num_partitions, seed))
    if installed is not None:
        return splits, installed
    parts = partition_dataset(
        name,
        path,
        test_path,
        test_fraction,
        num_partitions,
        scheme,
        alpha=alpha,
        labels_per_client=labels_per_client,
        seed=seed,
        min_partition_size=min_size,
        server_val_fraction=server_f,
        **dict(options),
    )
    return splits, parts


def client_partitions(data_cfg: Any, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    """The partitions (read-only index arrays into ``x_train``) that :func:`load_client_data` uses."""
    return _cfg_partitions(data_cfg, num_partitions, seed)[1]


def client_dataset(data_cfg: Any, seed: int) -> DatasetSplits:
    """The dataset (train/test split) that :func:`load_client_data` partitions, for ``data_cfg``."""
    args = _cfg_args(data_cfg)
    return load_dataset(*args[:4], seed, **_dataset_options(args))


def _dataset_options(args: tuple[Any, ...]) -> dict[str, Any]:
    """The options of :func:`_cfg_args` that the dataset reads."""
    keys = _option_keys(DATASETS, args[0])
    return {k: v for k, v in args[-1] if k in keys}


def install_partitions(
    data_cfg: Any,
    num_partitions: int,
    seed: int,
    parts: Sequence[np.ndarray],
    splits: DatasetSplits | None = None,
) -> None:
    """Make this process use ``parts`` (and ``splits``, if given) for ``data_cfg`` instead of computing them.

    For engines that run many clients in long-lived worker processes: the driver computes
    :func:`client_partitions` (and :func:`client_dataset`) once and installs the result in every worker.
    A worker given the dataset neither reads the files nor splits them, so it never imports scikit-learn
    (~150 MB per process); through Ray, its arrays are read-only views of the shared object store.
    """
    if len(parts) != int(num_partitions):
        raise ValueError(f"install_partitions: got {len(parts)} partitions, expected {int(num_partitions)}")
    if splits is not None and not isinstance(splits, DatasetSplits):
        raise TypeError(f"install_partitions: splits must be DatasetSplits, got {type(splits).__name__}")
    args = _cfg_args(data_cfg)
    if splits is not None:
        install_dataset(dataset_key(*args[:4], seed, **_dataset_options(args)), splits)
    frozen = tuple(np.asarray(p, dtype=np.int64) for p in parts)
    for p in frozen:
        p.flags.writeable = False
    _INSTALLED_PARTITIONS[_partitions_key(args, num_partitions, seed)] = frozen


def uninstall_partitions() -> None:
    """Forget every dataset and partition :func:`install_partitions` installed in this process."""
    uninstall_datasets()
    _INSTALLED_PARTITIONS.clear()


def load_client_data(data_cfg: Any, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    """Return partition ``partition_id`` of the training split, divided into local train/validation/test.

    ``data_cfg`` needs attributes ``name, path, test_path, test_fraction, partition, alpha,
    labels_per_client, val_fraction`` (optionally ``min_partition_size`` and ``client_test_fraction``). The
    split is one permutation seeded by ``seed + partition_id``: its first ``val_fraction`` is the validation
    split (at least one example when the partition has two or more and ``val_fraction > 0``), its last
    ``client_test_fraction`` the client's own test split (at least one example when the fraction is
    positive), the rest trains; at least one example always trains.
    """
    pid = int(partition_id)
    if not 0 <= pid < int(num_partitions):
        raise ValueError(f"partition_id: must be in [0, {int(num_partitions)}), got {partition_id}")
    splits, parts = _cfg_partitions(data_cfg, num_partitions, seed)
    idx = parts[pid]
    val_fraction = float(_cfg(data_cfg, "val_fraction", 0.0))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    test_fraction = float(_cfg(data_cfg, "client_test_fraction", 0.0) or 0.0)
    n = int(idx.shape[0])
    n_val = n_test = 0
    if test_fraction > 0.0 and n >= 2:
        n_test = min(max(1, int(round(n * test_fraction))), n - 1)
    if val_fraction > 0.0 and n - n_test >= 2:
        n_val = min(max(1, int(round(n * val_fraction))), n - n_test - 1)
    perm = np.random.default_rng(int(seed) + pid).permutation(n)
    val_idx = np.sort(idx[perm[:n_val]])
    train_idx = np.sort(idx[perm[n_val : n - n_test]])
    test_idx = np.sort(idx[perm[n - n_test :]]) if test_fraction > 0.0 else None
    return ClientData(
        x_train=splits.x_train[train_idx],
        y_train=splits.y_train[train_idx],
        x_val=splits.x_train[val_idx],
        y_val=splits.y_train[val_idx],
        x_test=None if test_idx is None else splits.x_train[test_idx],
        y_test=None if test_idx is None else splits.y_train[test_idx],
    )


def server_validation(data_cfg: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The server's validation split ``(x, y)`` of ``data_cfg`` (``data.server_val_fraction`` of the
    training split, no client's data; empty arrays when the fraction is 0)."""
    splits = client_dataset(data_cfg, seed)
    fraction = float(_cfg(data_cfg, "server_val_fraction", 0.0))
    server = server_split_indices(splits.y_train, fraction, seed)[0]
    return splits.x_train[server], splits.y_train[server]


def partition_sizes(data_cfg: Any, num_partitions: int, seed: int) -> list[int]:
    """Number of training-split examples in each partition (before the local validation split)."""
    _, parts = _cfg_partitions(data_cfg, num_partitions, seed)
    return [int(p.shape[0]) for p in parts]


def to_tensors(
    x: np.ndarray, y: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert arrays to float32 / int64 tensors on ``device`` (read-only inputs are copied)."""
    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y, dtype=np.int64)
    if not xa.flags.writeable:
        xa = xa.copy()
    if not ya.flags.writeable:
        ya = ya.copy()
    return torch.from_numpy(xa).to(device), torch.from_numpy(ya).to(device)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches; with ``shuffle`` the order comes from ``generator`` (CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        raise ValueError("batches: x and y differ in length")
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            sel = order[start : start + batch_size]
            yield x[sel], y[sel]
