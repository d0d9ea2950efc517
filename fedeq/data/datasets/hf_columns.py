"""Choosing the input and label columns of a Hugging Face dataset and turning them into fedeq's arrays.

Inputs (``data.input_key``; without it the first of :data:`IMAGE_KEYS` the dataset has, else every
numeric column but the label and ``data.partition_by``):

- an ``Image`` column: decoded, scaled from 0..255 to [0, 1], channels first (N, C, H, W); images of
  different modes are converted to RGB, images of different sizes are refused;
- an array column (say ``pixel_values``): uint8 scaled to [0, 1], other numbers kept; (H, W, C) with
  C in 1..4 becomes (C, H, W), (H, W) becomes (1, H, W), a vector of F values (1, 1, F);
- numeric scalar columns (tabular data): one feature each, (N, 1, 1, F), values kept as they are.

Labels (``data.label_key``; without it the first of :data:`LABEL_KEYS`): a ``ClassLabel`` or a column
of non-negative integers (floats with integer values are accepted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedeq.config.errors import ConfigError

if TYPE_CHECKING:
    import datasets

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "Columns", "choose_columns", "input_array", "label_array"]

IMAGE_KEYS = ("image", "img", "pixel_values")
"""Input columns tried in order when ``data.input_key`` is not set."""
LABEL_KEYS = ("label", "labels", "target")
"""Label columns tried in order when ``data.label_key`` is not set."""

Columns = tuple[tuple[str, ...], str]
"""``(input columns, label column)``."""


def _scalar_kind(feature: Any) -> str | None:
    """``"int"``, ``"float"``, ``"bool"``, ``"class"`` for a scalar numeric feature, else None."""
    import datasets
    import pyarrow as pa

    if isinstance(feature, datasets.ClassLabel):
        return "class"
    if not isinstance(feature, datasets.Value):
        return None
    t = feature.pa_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return "bool" if pa.types.is_boolean(t) else None


def choose_columns(
    features: datasets.Features,
    input_key: str | Sequence[str] | None,
    label_key: str | None,
    partition_by: str | None,
) -> Columns:
    """The input and label columns of a dataset with ``features``; :class:`ConfigError` naming the key."""
    names = list(features)
    listed = ", ".join(names)
    if label_key is not None:
        if label_key not in features:
            raise ConfigError(
                "data.label_key", "the source has no such column", f"one of: {listed}", label_key
            )
        label = label_key
    else:
        found = [k for k in LABEL_KEYS if k in features]
        if not found:
            problem = f"no label column found (tried {', '.join(LABEL_KEYS)})"
            raise ConfigError("data.label_key", problem, f"one of: {listed}", None)
        label = found[0]
    if _scalar_kind(features[label]) is None:
        problem = f"column '{label}' is not integer-like ({_describe(features[label])})"
        raise ConfigError("data.label_key", problem, "a ClassLabel or integer column", label)
    if partition_by is not None and partition_by not in features:
        raise ConfigError(
            "data.partition_by", "the source has no such column", f"one of: {listed}", partition_by
        )
    if input_key is not None:
        inputs = (input_key,) if isinstance(input_key, str) else tuple(input_key)
        bad = [k for k in inputs if k not in features or k == label]
        if bad or not inputs:
            allowed = f"one or more of: {', '.join(n for n in names if n != label)}"
            raise ConfigError("data.input_key", "the source has no such input column", allowed, input_key)
        if len(inputs) > 1 and any(_scalar_kind(features[k]) is None for k in inputs):
            problem = "several input columns must all be numeric scalars"
            raise ConfigError(
                "data.input_key", problem, "one image/array column or numeric columns", input_key
            )
        return inputs, label
    for key in IMAGE_KEYS:
        if key in features:
            return (key,), label
    numeric = tuple(
        k
        for k in names
        if k not in (label, partition_by) and _scalar_kind(features[k]) not in (None, "class")
    )
    if not numeric:
        problem = f"no input column found (tried {', '.join(IMAGE_KEYS)}, then numeric columns)"
        raise ConfigError("data.input_key", problem, f"one or more of: {listed}", None)
    return numeric, label


def _describe(feature: Any) -> str:
    return str(getattr(feature, "dtype", None) or type(feature).__name__)


def label_array(ds: datasets.Dataset, label: str) -> np.ndarray:
    """The labels as int64; :class:`ConfigError` on ``data.label_key`` unless non-negative integers."""
    y = np.asarray(ds.select_columns([label]).with_format("numpy")[:][label])
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    ok = np.issubdtype(y.dtype, np.number)
    if ok and y.size:
        yf = y.astype(np.float64)
        ok = bool(np.all(np.isfinite(yf)) and np.all(yf == np.round(yf)) and yf.min() >= 0)
    if not ok:
        problem = f"column '{label}' must hold non-negative integer class ids"
        raise ConfigError("data.label_key", problem, "a ClassLabel or integer column", label)
    return y.astype(np.int64)


def input_array(ds: datasets.Dataset, inputs: Sequence[str]) -> np.ndarray:
    """The inputs as float32 (N, C, H, W); :class:`ConfigError` on ``data.input_key`` if unusable."""
    import datasets

    if len(inputs) == 1 and isinstance(ds.features[inputs[0]], datasets.Image):
        x = _images(ds, inputs[0])
    elif len(inputs) == 1 and _scalar_kind(ds.features[inputs[0]]) is None:
        x = _arrays(ds, inputs[0])
    else:
        table = ds.select_columns(list(inputs)).with_format("numpy")[:]
        x = np.stack([np.asarray(table[k], dtype=np.float32) for k in inputs], axis=1)
        x = x.reshape(x.shape[0], 1, 1, x.shape[1])
    if x.size and not np.all(np.isfinite(x)):
        problem = f"input column(s) {', '.join(inputs)} hold NaN or infinite values"
        raise ConfigError(
            "data.input_key", problem, "finite numbers (fill or drop missing values)", list(inputs)
        )
    return x


def _images(ds: datasets.Dataset, key: str) -> np.ndarray:
    import datasets

    raw = np.asarray(ds.select_columns([key]).with_format("numpy")[:][key])
    if raw.dtype == object:  # ragged: modes (L, RGB, RGBA) or sizes differ
        rgb = ds.select_columns([key]).cast_column(key, datasets.Image(mode="RGB"))
        raw = np.asarray(rgb.with_format("numpy")[:][key])
        if raw.dtype == object:
            sizes = sorted({tuple(np.shape(a)[:2]) for a in raw})[:2]
            problem = f"images in column '{key}' differ in size ({sizes[0]} and {sizes[1]}, at least)"
            raise ConfigError("data.input_key", problem, "images of one size (resize them first)", key)
    return _channels_first(raw, key, channels_last=raw.ndim == 4)


def _arrays(ds: datasets.Dataset, key: str) -> np.ndarray:
    try:
        raw = np.asarray(ds.select_columns([key]).with_format("numpy")[:][key])
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            "data.input_key", f"column '{key}' is not an array ({exc})", "numbers", key
        ) from None
    if raw.dtype == object or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        problem = f"column '{key}' does not hold numeric arrays of one shape"
        raise ConfigError("data.input_key", problem, "an image, array or numeric column", key)
    return _channels_first(raw, key)


def _channels_first(raw: np.ndarray, key: str, channels_last: bool | None = None) -> np.ndarray:
    """(N, C, H, W) float32 from (N, F), (N, H, W) or 4-d arrays; ``channels_last=None`` guesses."""
    x = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
    if x.ndim == 2:
        return x.reshape(x.shape[0], 1, 1, x.shape[1])
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        if channels_last is None:
            channels_last = x.shape[-1] <= 4 < x.shape[1]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_last else x
    problem = f"column '{key}' has per-example shape {raw.shape[1:]}"
    raise ConfigError("data.input_key", problem, "(F,), (H, W), (H, W, C) or (C, H, W) per example", key)
