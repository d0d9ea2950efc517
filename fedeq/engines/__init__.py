"""Engines (registered in :data:`fedeq.registry.ENGINES`)."""

from fedeq.registry import ENGINES

for _name in ("ray", "flower"):
    ENGINES.register(_name, _name)
