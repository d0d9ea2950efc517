"""Checking a run's data before any work: the source, its contents and the partition over clients.

:func:`check_data` is what ``fedeq simulate`` and ``fedeq deploy`` call after the config is validated:
the dataset's own :meth:`~fedeq.data.DatasetSource.check`, then the dataset is loaded and partitioned
once (both are cached, so the run reuses them). Every problem is a one-line
:class:`~fedeq.config.ConfigError` naming the key; partitions smaller than a batch are a one-line warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedeq.config.errors import ConfigError
from fedeq.data.base import DatasetSplits
from fedeq.data.clients import client_dataset, client_partitions
from fedeq.registry import DATASETS

__all__ = ["DataReport", "check_data", "check_partitions", "check_splits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataReport:
    """What :func:`check_data` found: the dataset, the partition sizes and the warnings (one line each)."""

    splits: DatasetSplits
    sizes: list[int]
    warnings: tuple[str, ...] = ()

    def warn(self) -> None:
        """Log each warning as one line (logger ``fedeq.data.checks``)."""
        for line in self.warnings:
            logger.warning("fedeq: warning: %s", line)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_data(cfg: Any, *, warn: bool = True) -> DataReport:
    """Check ``cfg.data`` against ``cfg.num_clients``, ``cfg.seed`` and ``cfg.train.batch_size``.

    Raises :class:`ConfigError` for a source that cannot be read, a missing column or array, labels that
    are not class ids, NaN inputs, fewer training examples than clients, or a partition the scheme
    cannot make (or that leaves a client without examples). Returns the report, logged when ``warn``
    (a caller with checks of its own logs it after them, so an error line stays alone).
    """
    data = cfg.data
    source_cls = DATASETS.get(str(data.name).strip().lower())
    origin = getattr(source_cls, "origin_key", "data.name")
    try:
        source_cls(**{k: getattr(data, k, None) for k in getattr(source_cls, "option_keys", ())}).check(data)
        splits = client_dataset(data, cfg.seed)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError, KeyError) as exc:
        key, sep, rest = str(exc).partition(": ")
        if sep and key.startswith("data."):
            got = getattr(data, key[5:], None)
            raise ConfigError(key, rest, "see docs/custom_data.md", got) from None
        problem = f"cannot load the dataset ({type(exc).__name__}: {_one_line(exc)})"
        got = getattr(data, origin.removeprefix("data."), None)
        raise ConfigError(origin, problem, "a readable dataset", got) from None
    check_splits(splits, origin, getattr(data, origin.removeprefix("data."), None))
    sizes = check_partitions(cfg, splits)
    batch = int(getattr(getattr(cfg, "train", None), "batch_size", 0) or 0)
    tiny = [s for s in sizes if s < batch]
    notes: tuple[str, ...] = ()
    if tiny:
        notes = (
            f"data: {len(tiny)} of {len(sizes)} partitions hold fewer examples than "
            f"train.batch_size={batch} (smallest: {min(tiny)})",
        )
    report = DataReport(splits, sizes, notes)
    if warn:
        report.warn()
    return report


def check_splits(splits: DatasetSplits, origin: str = "data.name", got: Any = None) -> None:
    """Finite inputs and non-negative integer labels of one length in both splits; problems name
    ``origin`` (the key that says where the examples come from) with the value ``got``."""
    got = splits.name if got is None else got
    for part, x, y in (("training", splits.x_train, splits.y_train), ("test", splits.x_test, splits.y_test)):
        if x.shape[0] != y.shape[0]:
            problem = f"the {part} split has {x.shape[0]} inputs but {y.shape[0]} labels"
            raise ConfigError(origin, problem, "one label per example", got)
        if x.size and not np.all(np.isfinite(x)):
            problem = f"the {part} split holds NaN or infinite inputs"
            raise ConfigError(origin, problem, "finite inputs (fill or drop missing values)", got)
        if y.size and (not np.issubdtype(y.dtype, np.integer) or int(y.min()) < 0):
            problem = f"the {part} split's labels are not non-negative integers"
            raise ConfigError(origin, problem, "class ids 0..K-1", got)


def check_partitions(cfg: Any, splits: DatasetSplits) -> list[int]:
    """Partition the training split over ``cfg.num_clients`` clients; return the partition sizes."""
    n, clients = int(splits.y_train.shape[0]), int(cfg.num_clients)
    if n < clients:
        problem = f"the training split holds {n} examples, fewer than the clients"
        raise ConfigError("num_clients", problem, f"an integer in [1, {n}]", clients)
    scheme = cfg.data.partition
    try:
        sizes = [int(p.shape[0]) for p in client_partitions(cfg.data, clients, cfg.seed)]
    except ConfigError:
        raise
    except ValueError as exc:
        problem = f"cannot split {n} examples over {clients} clients ({_one_line(exc)})"
        allowed = "a scheme and options the dataset allows"
        raise ConfigError("data.partition", problem, allowed, scheme) from None
    empty = [i for i, size in enumerate(sizes) if size == 0]
    if empty:
        problem = f"{len(empty)} of {clients} clients get no examples (client {empty[0]}, ...)"
        raise ConfigError("data.partition", problem, "a scheme that gives every client examples", scheme)
    return sizes
