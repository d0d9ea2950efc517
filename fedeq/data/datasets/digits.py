"""``digits``: scikit-learn's 1,797 8×8 handwritten digits, pixels scaled to [0, 1]."""

from __future__ import annotations

import numpy as np

from fedeq.data.datasets.base import DatasetSource, LabelledImages
from fedeq.registry import DATASETS

__all__ = ["Digits"]


@DATASETS.register("digits")
class Digits(DatasetSource):
    """The UCI optical digits bundled with scikit-learn (no download), as (N, 1, 8, 8) images."""

    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        return LabelledImages(x, np.asarray(bunch.target, dtype=np.int64))
