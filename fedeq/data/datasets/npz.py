"""``npz``: labelled images from a ``.npz`` file (keys ``x`` and ``y``), optionally a second test file."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fedeq.config.errors import ConfigError
from fedeq.data.datasets.base import DatasetSource, LabelledImages, register_dataset

__all__ = ["Npz", "read_npz"]

_ALLOWED = "an .npz file with arrays x (N, ...) and y (N,) of integer labels"


@register_dataset("npz")
class Npz(DatasetSource):
    """``data.path`` (required) and, if given, ``data.test_path`` as a fixed test split of the same shape."""

    reads_path = True
    origin_key = "data.path"

    def check(self, data_cfg: Any) -> None:
        """Both files exist (their contents are checked when :meth:`load` reads them)."""
        for key in ("path", "test_path"):
            value = getattr(data_cfg, key, None)
            if value and not os.path.isfile(os.path.expanduser(str(value))):
                raise ConfigError(f"data.{key}", "npz file does not exist", _ALLOWED, value)

    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        assert path is not None
        x, y = read_npz(path)
        if test_path is None:
            return LabelledImages(x, y)
        x_test, y_test = read_npz(test_path, key="data.test_path")
        if x_test.shape[1:] != x.shape[1:]:
            raise ConfigError(
                "data.test_path",
                f"'{test_path}' has example shape {x_test.shape[1:]}, but '{path}' has {x.shape[1:]}",
                "a test file whose examples have the shape of data.path's",
                test_path,
            )
        return LabelledImages(x, y, x_test, y_test)


def read_npz(path: str, key: str = "data.path") -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x`` and ``y`` from an .npz file and normalise them to (N, C, H, W) float32 / int64.

    ``x`` may be (N, F), (N, H, W) or (N, C, H, W); uint8 pixels are scaled to [0, 1]. ``y`` must hold
    non-negative integer class labels, one per example. Problems are a :class:`ConfigError` on ``key``.
    """

    def fail(problem: str) -> ConfigError:
        return ConfigError(key, problem, _ALLOWED, path)

    if not os.path.isfile(path):
        raise fail("npz file does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                found = ", ".join(sorted(archive.files))
                raise fail(f"{os.path.basename(path)} lacks array '{missing[0]}' (found: {found})")
            x_raw, y_raw = archive["x"], archive["y"]
    except (OSError, EOFError, ValueError) as exc:  # not a readable npz archive (or pickled arrays)
        if isinstance(exc, ConfigError):
            raise
        raise fail(f"cannot read npz file ({' '.join(str(exc).split())})") from exc

    if not (np.issubdtype(x_raw.dtype, np.number) or x_raw.dtype == np.bool_):
        raise fail(f"array 'x' is not numeric (dtype {x_raw.dtype})")
    x = x_raw.astype(np.float32) / 255.0 if x_raw.dtype == np.uint8 else x_raw.astype(np.float32)
    if x.ndim == 2:
        x = x.reshape(x.shape[0], 1, 1, x.shape[1])
    elif x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim != 4:
        raise fail(f"array 'x' must have shape (N,F), (N,H,W) or (N,C,H,W), got {x_raw.shape}")
    y_raw = np.asarray(y_raw).reshape(-1)
    if y_raw.shape[0] != x.shape[0]:
        raise fail(f"arrays 'x' and 'y' differ in length ({x.shape[0]} and {y_raw.shape[0]})")
    if not np.issubdtype(y_raw.dtype, np.number):
        raise fail(f"array 'y' must hold non-negative integer class labels (dtype {y_raw.dtype})")
    y64 = y_raw.astype(np.float64)
    if y_raw.size and (not np.all(np.isfinite(y64)) or np.any(y64 != np.round(y64)) or y64.min() < 0):
        raise fail("array 'y' must hold non-negative integer class labels")
    return x, y_raw.astype(np.int64)
