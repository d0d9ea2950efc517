"""Monotone operator equilibrium networks (MON-DEQ, Winston & Kolter, NeurIPS 2020): dense and convolutional.

The layer computes ``z* = relu(W z* + U x + b)`` with a monotone parametrization of ``W``
(:mod:`~fedeq.models.mondeq.operators`), so ``z*`` is unique for every input and every weight. It is found
by operator splitting (:mod:`~fedeq.models.mondeq.splitting`: forward-backward or Peaceman-Rachford, with
the device tier's solver applied to the splitting map), and its implicit gradient solves the adjoint
inclusion with the same splitting (:mod:`~fedeq.models.mondeq.adjoint`). The classifiers, registered as
``mondeq`` and ``conv_mondeq``, are in :mod:`~fedeq.models.mondeq.model`.
"""

from fedeq.models.mondeq.adjoint import ImplicitRelu, adjoint_map
from fedeq.models.mondeq.model import (
    ConvMonDEQ,
    MonDEQ,
    MonotoneConv,
    MonotoneLinear,
    build_conv_mondeq,
    build_mondeq,
)
from fedeq.models.mondeq.operators import (
    ConvOperator,
    DenseOperator,
    Operator,
    as_operator,
    monotone_margin,
    monotone_weight,
)
from fedeq.models.mondeq.splitting import SPLITTINGS, default_alpha, monotone_solve, splitting_map

__all__ = [
    "SPLITTINGS",
    "ConvMonDEQ",
    "ConvOperator",
    "DenseOperator",
    "ImplicitRelu",
    "MonDEQ",
    "MonotoneConv",
    "MonotoneLinear",
    "Operator",
    "adjoint_map",
    "as_operator",
    "build_conv_mondeq",
    "build_mondeq",
    "default_alpha",
    "monotone_margin",
    "monotone_solve",
    "monotone_weight",
    "splitting_map",
]
