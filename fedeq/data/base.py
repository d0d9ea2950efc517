"""Loading a dataset by name: the seeded train/test split, and the per-process cache of loaded datasets.

Datasets are loaded once per process and cached (many simulated clients share one process). Cached arrays
are marked read-only so that no client can corrupt the shared copy; index them (which copies) before
mutating. Engines with long-lived worker processes load a dataset once and install it in every worker
(:func:`install_dataset`, through :func:`fedeq.data.install_partitions`).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedeq.data.datasets.base import DatasetSource
from fedeq.registry import DATASETS

__all__ = [
    "DatasetKey",
    "DatasetSplits",
    "dataset_key",
    "hashable_option",
    "install_dataset",
    "load_dataset",
    "split_indices",
    "split_train_test",
    "uninstall_datasets",
]

Options = tuple[tuple[str, Any], ...]
"""A source's ``data.*`` options as ``((key, value), ...)`` in the order of its ``option_keys``."""

DatasetKey = tuple[str, str | None, str | None, float, int, Options]
"""``(name, path, test_path, test_fraction, seed, options)`` checked and normalised by :func:`dataset_key`."""


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset with a held-out test split; images are float32 (N, C, H, W), labels int64 (N,).

    ``columns`` holds further per-example values of the training split (say, a writer id), for
    partitioners such as ``natural``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)

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
    **options: Any,
) -> DatasetSplits:
    """Load a registered dataset (``digits``, ``mnist5k``, ``npz``, ``hf``, ...) with a seeded, stratified
    test split; cached per arguments.

    ``path``/``test_path`` are used only by datasets that read files (``npz``); ``test_fraction`` is
    ignored when ``test_path`` is given or the source has its own test split. ``options`` are the
    ``data.*`` keys the dataset reads (``load_dataset("hf", source="data.csv", label_key="y")``).
    Calls with equivalent arguments return the very same (read-only) object: the one that
    :func:`install_dataset` installed in this process, if any.
    """
    key = dataset_key(name, path, test_path, test_fraction, seed, **options)
    installed = _INSTALLED_DATASETS.get(key)
    return installed if installed is not None else _load_dataset_cached(*key)


def dataset_key(
    name: str, path: str | None, test_path: str | None, test_fraction: float, seed: int, **options: Any
) -> DatasetKey:
    """The arguments of :func:`load_dataset`, checked and normalised (absolute paths, unused fraction 0,
    the source's options in order with ``None`` for absent ones)."""
    key_name = str(name).strip().lower()
    if key_name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset '{name}'; allowed: {', '.join(DATASETS.names())}")
    source = DATASETS.get(key_name)
    built = source(**options)  # a source that reads no options may define __init__ without them
    key_options = tuple((k, hashable_option(v)) for k, v in getattr(built, "options", {}).items())
    if source.reads_path:
        if not path:
            raise ValueError(f"data.path: required for dataset '{key_name}'")
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
    return key_name, key_path, key_test, tf, int(seed), key_options


def hashable_option(value: Any) -> Any:
    """A ``data.*`` option value fit for a cache key (a list becomes a tuple)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def install_dataset(key: DatasetKey, splits: DatasetSplits) -> None:
    """Make :func:`load_dataset` return ``splits`` (frozen here) for ``key`` in this process."""
    if not isinstance(splits, DatasetSplits):
        raise TypeError(f"install_dataset: splits must be DatasetSplits, got {type(splits).__name__}")
    for a in (splits.x_train, splits.y_train, splits.x_test, splits.y_test):
        a.flags.writeable = False
    _INSTALLED_DATASETS[key] = splits


def uninstall_datasets() -> None:
    """Forget every dataset :func:`install_dataset` installed in this process."""
    _INSTALLED_DATASETS.clear()


_INSTALLED_DATASETS: dict[DatasetKey, DatasetSplits] = {}
"""Datasets handed to this process by :func:`install_dataset`, keyed by :func:`dataset_key`."""


@functools.lru_cache(maxsize=16)
def _load_dataset_cached(
    name: str, path: str | None, test_path: str | None, test_fraction: float, seed: int, options: Options
) -> DatasetSplits:
    source: DatasetSource = DATASETS.get(name)(**dict(options))
    images = source.load(path, test_path) if source.reads_path else source.load(None, None)
    columns = {k: np.asarray(v) for k, v in images.columns.items()}
    if images.x_test is None or images.y_test is None:
        train, test = split_indices(images.y, test_fraction, seed)
        x_train, y_train, x_test, y_test = images.x[train], images.y[train], images.x[test], images.y[test]
        columns = {k: v[train] for k, v in columns.items()}
    else:
        x_train, y_train, x_test, y_test = images.x, images.y, images.x_test, images.y_test
    num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test, *columns.values())]
    for a in arrays:
        a.flags.writeable = False
    named = dict(zip(columns, arrays[4:], strict=True))
    return DatasetSplits(name, *arrays[:4], num_classes=num_classes, columns=named)


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of ``0..len(y)-1`` ``(train, test)``, stratified by label when feasible."""
    index = np.arange(len(y))
    train, test, _, _ = split_train_test(index, y, test_fraction, seed)
    return train, test


def split_train_test(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/test split ``(x_train, x_test, y_train, y_test)``, stratified by label when feasible."""
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
