"""The DEQ core: the implicit layer, its solvers, backward modes and regularizers."""

from fedeq.deq.layer import DEQ, BackwardStats, DEQOutput, DEQSettings
from fedeq.deq.solvers import SolverStats, solve

__all__ = ["DEQ", "BackwardStats", "DEQOutput", "DEQSettings", "SolverStats", "solve"]
