"""Datasets (registered in :data:`fedeq.registry.DATASETS`)."""

from fedeq.data import core
from fedeq.registry import DATASETS

for _name in core.DATASETS:
    DATASETS.register(_name, _name)
