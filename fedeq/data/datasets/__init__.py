"""Datasets (registered in :data:`fedeq.registry.DATASETS`): one module per dataset.

Importing this package registers the built-ins, in this order: ``digits``, ``mnist5k``, ``npz``, ``hf``. Each
module is light: the libraries a dataset reads with are imported when it is loaded.
"""

from fedeq.data.datasets import digits as _digits  # noqa: I001  (import order = registration order)
from fedeq.data.datasets import mnist5k as _mnist5k
from fedeq.data.datasets import npz as _npz
from fedeq.data.datasets import hf as _hf
from fedeq.data.datasets.base import DatasetSource, LabelledImages, register_dataset

__all__ = ["DatasetSource", "LabelledImages", "register_dataset"]

del _digits, _mnist5k, _npz, _hf
