"""Model families (registered in :data:`fedeq.registry.MODELS`)."""

from fedeq.models import core
from fedeq.registry import MODELS

for _name, _fn in core.MODELS.items():
    MODELS.register(_name, _fn)
