"""Partitioners (registered in :data:`fedeq.registry.PARTITIONERS`)."""

from fedeq.data import core
from fedeq.registry import PARTITIONERS

for _name in core.PARTITION_SCHEMES:
    PARTITIONERS.register(_name, _name)
