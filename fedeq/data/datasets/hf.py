"""``hf``: a Hugging Face dataset through the ``datasets`` library (Hub id, saved dataset, image folder,
parquet or CSV file).

Keys (all under ``data``): ``source`` (required; see :mod:`~fedeq.data.datasets.hf_open`), ``input_key``
and ``label_key`` (see :mod:`~fedeq.data.datasets.hf_columns` for the defaults tried), ``train_split``
(default ``train``) and ``test_split`` (default: the source's own ``test`` split, else a stratified
``test_fraction`` of the training split), and ``partition_by`` (a column kept for
``data.partition=natural``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fedeq.config.errors import ConfigError
from fedeq.data.datasets.base import DatasetSource, LabelledImages, register_dataset
from fedeq.data.datasets.hf_columns import Columns, choose_columns, input_array, label_array
from fedeq.data.datasets.hf_open import SOURCE_ALLOWED, open_source, pick_splits

__all__ = ["HuggingFace"]


@register_dataset("hf")
class HuggingFace(DatasetSource):
    """A dataset read with ``datasets``: inputs normalised to float32 (N, C, H, W), labels int64."""

    option_keys = ("source", "input_key", "label_key", "train_split", "test_split", "partition_by")
    origin_key = "data.source"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        source = self.options["source"]
        if isinstance(source, str) and os.path.exists(os.path.expanduser(source)):
            self.options["source"] = os.path.abspath(os.path.expanduser(source))

    def check(self, data_cfg: Any) -> None:
        """The source opens, has the splits and the columns; labels are integer-like by type."""
        self._columns()

    def _columns(self) -> tuple[Any, Any, Columns]:
        source = self.options["source"]
        if not source:
            raise ConfigError("data.source", "data.name=hf needs a source", SOURCE_ALLOWED, source)
        train, test = pick_splits(
            open_source(str(source)), self.options["train_split"], self.options["test_split"]
        )
        o = self.options
        columns = choose_columns(train.features, o["input_key"], o["label_key"], o["partition_by"])
        if test is not None:
            missing = [k for k in (*columns[0], columns[1]) if k not in test.features]
            if missing:
                problem = f"the test split lacks column '{missing[0]}'"
                raise ConfigError(
                    "data.test_split", problem, "a split with the training columns", o["test_split"]
                )
        return train, test, columns

    def load(self, path: str | None, test_path: str | None) -> LabelledImages:
        train, test, (inputs, label) = self._columns()
        x, y = input_array(train, inputs), label_array(train, label)
        by = self.options["partition_by"]
        columns = {by: _id_column(train, by)} if by else {}
        if test is None:
            return LabelledImages(x, y, columns=columns)
        x_test, y_test = input_array(test, inputs), label_array(test, label)
        if x_test.shape[1:] != x.shape[1:]:
            problem = f"test examples have shape {x_test.shape[1:]}, training examples {x.shape[1:]}"
            raise ConfigError("data.test_split", problem, "a split of the training shape", test.split)
        return LabelledImages(x, y, x_test, y_test, columns=columns)


def _id_column(ds: Any, key: str) -> np.ndarray:
    values = np.asarray(ds.select_columns([key]).with_format("numpy")[:][key])
    if values.dtype == object and any(v is None for v in values):
        raise ConfigError(
            "data.partition_by", f"column '{key}' has missing values", "a column without nulls", key
        )
    return values
