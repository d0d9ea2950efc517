"""``npz``: labelled images from a ``.npz`` file (keys ``x`` and ``y``), optionally a second test file."""

from __future__ import annotations

import os

import numpy as np

from fedeq.data.datasets.base import DatasetSource, LabelledImages
from fedeq.registry import DATASETS

__all__ = ["Npz", "read_npz"]


@DATASETS.register("npz")
class Npz(DatasetSource):
    """``data.path`` (required) and, if given, ``data.test_path`` as a fixed test split of the same shape."""

    reads_path = True

    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        assert path is not None
        x, y = read_npz(path)
        if test_path is None:
            return LabelledImages(x, y)
        x_test, y_test = read_npz(test_path)
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"data.test_path: '{test_path}' has example shape {x_test.shape[1:]}, "
                f"but '{path}' has {x.shape[1:]}"
            )
        return LabelledImages(x, y, x_test, y_test)


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x`` and ``y`` from an .npz file and normalise them to (N, C, H, W) float32 / int64.

    ``x`` may be (N, F), (N, H, W) or (N, C, H, W); uint8 pixels are scaled to [0, 1]. ``y`` must hold
    non-negative integer class labels, one per example. Errors name ``data.path`` and the problem.
    """
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
