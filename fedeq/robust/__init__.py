"""Robustness of DEQ classifiers: attacks through the equilibrium, robust accuracy, and input optimization.

- :mod:`~fedeq.robust.ball`: the ε-balls (norms, projections onto ball and ball ∩ box, random start);
- :mod:`~fedeq.robust.attacks`: FGSM / PGD with a chosen gradient through the DEQ (:func:`run_attack`);
- :mod:`~fedeq.robust.accuracy`: clean and robust accuracy on a data set (:func:`robust_accuracy`);
- :mod:`~fedeq.robust.adaptive`: PGD with BPDA through an input-purifying defense (:func:`bpda_attack`);
- :mod:`~fedeq.robust.input_problem`: input problems through an equilibrium and their optimality residuals;
- :mod:`~fedeq.robust.jiio`: joint inference and input optimization (the joint iteration);
- :mod:`~fedeq.robust.naive`: the naive loop (full forward and adjoint solves per gradient step);
- :mod:`~fedeq.robust.jiio_attack` / :mod:`~fedeq.robust.jiio_training`: the JIIO attack and JIIO
  adversarial training with the parameter backward warm-started from JIIO's adjoint;
- :mod:`~fedeq.robust.inverse`: inverse problems (inpainting, denoising) over the code of a DEQ decoder.
"""

from fedeq.robust.accuracy import RobustStats, robust_accuracy
from fedeq.robust.adaptive import bpda_attack
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
from fedeq.robust.ball import NORMS, project, project_ball_box, random_start, sample_norms
from fedeq.robust.input_problem import InputProblem, JIIOResult, Residuals, stationarity
from fedeq.robust.inverse import DEQDecoder, inpainting_problem, make_observation, train_decoder
from fedeq.robust.jiio import JIIOSchedule, jiio
from fedeq.robust.jiio_attack import jiio_attack, jiio_attack_state
from fedeq.robust.jiio_training import jiio_adversarial_loss
from fedeq.robust.naive import naive_input_optimization, solve_objective

__all__ = [
    "ATTACKS",
    "GRADIENTS",
    "NORMS",
    "AttackConfig",
    "AttackResult",
    "DEQDecoder",
    "InputProblem",
    "JIIOResult",
    "JIIOSchedule",
    "LossFn",
    "Residuals",
    "RobustStats",
    "TemporaryEvalMode",
    "bpda_attack",
    "deq_cost",
    "fgsm",
    "forward_budget",
    "gradient_overrides",
    "inpainting_problem",
    "input_gradient",
    "jiio",
    "jiio_adversarial_loss",
    "jiio_attack",
    "jiio_attack_state",
    "make_observation",
    "naive_input_optimization",
    "pgd",
    "project",
    "project_ball_box",
    "random_start",
    "robust_accuracy",
    "run_attack",
    "sample_norms",
    "solve_objective",
    "stationarity",
    "train_decoder",
]
