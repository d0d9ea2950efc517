"""Backward modes (registered in :data:`fedeq.registry.BACKWARDS`)."""

from fedeq.deq import layer
from fedeq.registry import BACKWARDS

for _name in layer.BACKWARD_MODES:
    BACKWARDS.register(_name, _name)
