"""What a dataset is to fedeq: a named source of labelled images, registered in ``DATASETS``.

A dataset module registers a :class:`DatasetSource` subclass under its config name (``data.name``)::

    @register_dataset("my_data")
    class MyData(DatasetSource):
        def load(self, path, test_path):
            return LabelledImages(x, y)

:func:`fedeq.data.load_dataset` draws the seeded, stratified test split, checks the labels' range, caches
the result and marks its arrays read-only; a source only reads and normalises its examples. Before any
work, ``fedeq simulate`` calls :meth:`DatasetSource.check` and then loads and partitions the data once
(:func:`fedeq.data.check_data`), so a bad source exits with one line naming the key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedeq.registry import DATASETS

__all__ = ["DatasetSource", "LabelledImages", "register_dataset"]

S = TypeVar("S", bound=type)


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """The examples of a source: images float32 (N, C, H, W), labels int64 (N,) of classes ``0..K-1``.

    ``x_test``/``y_test`` hold a fixed test split when the source has one (say, a second file); without
    them the caller splits ``x``/``y`` into train and test. ``columns`` holds further per-example values
    of ``x``'s rows (say, a writer id for ``data.partition=natural``), each an array of length N.
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)


class DatasetSource(ABC):
    """A dataset by name: subclasses implement :meth:`load` and say which ``data.*`` keys they read.

    A source is built with the values of its :attr:`option_keys` (``self.options``), and may override
    :meth:`check` to report a bad source before anything is loaded.
    """

    reads_path: ClassVar[bool] = False
    """True: ``data.path`` is required (and ``data.test_path`` may name a fixed test split); False: both
    are ignored (and do not take part in the cache key)."""

    option_keys: ClassVar[tuple[str, ...]] = ()
    """Further ``data.*`` keys the source reads (``source``, ``input_key``, ...); their values are in
    ``self.options`` and take part in the cache key."""

    origin_key: ClassVar[str] = "data.name"
    """The config key that says where the examples come from, named in errors about their contents."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_keys))
        if unknown:
            allowed = ", ".join(self.option_keys) or "none"
            raise ValueError(f"data.{unknown[0]}: not an option of this dataset (options: {allowed})")
        self.options: dict[str, Any] = {key: options.get(key) for key in self.option_keys}

    @abstractmethod
    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        """Read the examples; ``ValueError`` naming the config key (``data.path: ...``) on bad input.

        ``path``/``test_path`` are absolute (or None) and given only to sources with ``reads_path``.
        """

    def check(self, data_cfg: Any) -> None:
        """Raise :class:`fedeq.config.ConfigError` naming the key if ``data_cfg`` cannot be loaded.

        Called before any work, on the source built from the ``data`` section of the config (so
        ``self.options`` hold its values), with that section; the default checks nothing
        (what :meth:`load` raises is reported as well). Cheap checks belong here: a file that does not
        exist, a missing array or column.
        """
        return None


def register_dataset(name: str, source: Any = None) -> Any:
    """Register a :class:`DatasetSource` subclass as ``data.name=<name>`` (an alias of
    ``DATASETS.register``); without ``source`` it is a decorator."""
    if source is None:
        register: Callable[[S], S] = DATASETS.register(name)
        return register
    return DATASETS.register(name, source)
