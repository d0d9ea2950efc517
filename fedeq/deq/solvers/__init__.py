"""Fixed-point solvers (registered in :data:`fedeq.registry.SOLVERS`)."""

from fedeq.deq.solvers import core
from fedeq.registry import SOLVERS

for _name, _fn in core.SOLVERS.items():
    SOLVERS.register(_name, _fn)
