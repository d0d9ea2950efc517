"""Batched fixed-point solvers, registered in :data:`fedeq.registry.SOLVERS`.

``solve(f, z0, solver, max_iter, tol, stop_mode, **options)`` runs the solver registered as ``solver``
(built with ``options``), or a :class:`Solver` object, in the one loop of :mod:`.iterate`; its conventions
(exact budgets, best candidate, per-sample stopping, divergence) hold for every solver. A new solver is a
:class:`Solver` subclass in its own module, decorated with ``@SOLVERS.register("name")``.
"""

from fedeq.deq.solvers.base import STOP_MODES, OuterGradient, Solver, SolverStats, check_solver_args
from fedeq.deq.solvers.iterate import Tracker, get_solver, solve

# Built-ins register themselves on import, in the order that messages list them.
# isort: off
from fedeq.deq.solvers.fixed_point import FixedPoint
from fedeq.deq.solvers.anderson import Anderson
from fedeq.deq.solvers.broyden import Broyden, BroydenFactors, broyden_apply, broyden_transpose_apply

# isort: on

__all__ = [
    "STOP_MODES",
    "Anderson",
    "Broyden",
    "BroydenFactors",
    "FixedPoint",
    "OuterGradient",
    "Solver",
    "SolverStats",
    "Tracker",
    "broyden_apply",
    "broyden_transpose_apply",
    "check_solver_args",
    "get_solver",
    "solve",
]
