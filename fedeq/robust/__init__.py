"""Robustness of DEQ classifiers: attacks through the equilibrium, robust accuracy, and input optimization.

- :mod:`~fedeq.robust.ball`: the ε-balls (norms, projection, random start);
- :mod:`~fedeq.robust.attacks`: FGSM / PGD with a chosen gradient through the DEQ (:func:`run_attack`);
- :mod:`~fedeq.robust.accuracy`: clean and robust accuracy on a data set (:func:`robust_accuracy`);
- :mod:`~fedeq.robust.jiio`: joint inference and input optimization, and the JIIO attack;
- :mod:`~fedeq.robust.inverse`: inverse problems (inpainting) over the code of a generative DEQ.
"""

from fedeq.robust.accuracy import RobustStats, robust_accuracy
from fedeq.robust.attacks import (
    ATTACKS,
    GRADIENTS,
    AttackConfig,
    AttackResult,
    LossFn,
    TemporaryEvalMode,
    deq_cost,
    fgsm,
    forward_budget,
    gradient_overrides,
    input_gradient,
    pgd,
    run_attack,
)
from fedeq.robust.ball import NORMS, project, random_start, sample_norms
from fedeq.robust.inverse import DEQDecoder, inpainting_problem, make_observation, train_decoder
from fedeq.robust.jiio import (
    InputProblem,
    JIIOResult,
    Residuals,
    jiio,
    jiio_attack,
    naive_input_optimization,
    solve_objective,
    stationarity,
)

__all__ = [
    "ATTACKS",
    "GRADIENTS",
    "NORMS",
    "AttackConfig",
    "AttackResult",
    "DEQDecoder",
    "InputProblem",
    "JIIOResult",
    "LossFn",
    "Residuals",
    "RobustStats",
    "TemporaryEvalMode",
    "deq_cost",
    "fgsm",
    "forward_budget",
    "gradient_overrides",
    "inpainting_problem",
    "input_gradient",
    "jiio",
    "jiio_attack",
    "make_observation",
    "naive_input_optimization",
    "pgd",
    "project",
    "random_start",
    "robust_accuracy",
    "run_attack",
    "sample_norms",
    "solve_objective",
    "stationarity",
    "train_decoder",
]
