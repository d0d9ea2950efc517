"""What a dataset is to fedeq: a named source of labelled images, registered in ``DATASETS``.

A dataset module registers a :class:`DatasetSource` subclass under its config name (``data.name``)::

    @DATASETS.register("my_data")
    class MyData(DatasetSource):
        def load(self, path, test_path):
            return LabelledImages(x, y)

:func:`fedeq.data.load_dataset` draws the seeded, stratified test split, checks the labels' range, caches
the result and marks its arrays read-only; a source only reads and normalises its examples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["DatasetSource", "LabelledImages"]


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """The examples of a source: images float32 (N, C, H, W), labels int64 (N,) of classes ``0..K-1``.

    ``x_test``/``y_test`` hold a fixed test split when the source has one (say, a second file); without
    them the caller splits ``x``/``y`` into train and test.
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


class DatasetSource(ABC):
    """A dataset by name: subclasses implement :meth:`load` and say whether they read ``data.path``."""

    reads_path: ClassVar[bool] = False
    """True: ``data.path`` is required (and ``data.test_path`` may name a fixed test split); False: both
    are ignored (and do not take part in the cache key)."""

    @abstractmethod
    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        """Read the examples; ``ValueError`` naming the config key (``data.path: ...``) on bad input.

        ``path``/``test_path`` are absolute (or None) and given only to sources with ``reads_path``.
        """
