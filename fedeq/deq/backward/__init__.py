"""Backward modes of the DEQ, registered in :data:`fedeq.registry.BACKWARDS`.

A backward mode is a :class:`Backward` subclass in its own module, decorated with
``@BACKWARDS.register("name")``; ``requires_solver`` names the forward solver it needs (read by
:func:`required_solver` and :func:`check_backward_solver`, which settings and config validation call).
"""

from fedeq.deq.backward.base import (
    Backward,
    BackwardStats,
    HookBackward,
    check_backward_solver,
    get_backward,
    required_solver,
)

# Built-ins register themselves on import, in the order that messages list them.
# isort: off
from fedeq.deq.backward.ift import IFT, solve_backward
from fedeq.deq.backward.phantom import Phantom, phantom_unroll
from fedeq.deq.backward.jfb import JFB
from fedeq.deq.backward.broyden_reuse import BroydenReuse, check_reuse_options, reuse_adjoint

# isort: on

__all__ = [
    "IFT",
    "JFB",
    "Backward",
    "BackwardStats",
    "BroydenReuse",
    "HookBackward",
    "Phantom",
    "check_backward_solver",
    "check_reuse_options",
    "get_backward",
    "phantom_unroll",
    "required_solver",
    "reuse_adjoint",
    "solve_backward",
]
