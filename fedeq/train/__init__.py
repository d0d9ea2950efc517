"""Local training and evaluation of fedeq models under a solver budget.

- :mod:`~fedeq.train.local`: :func:`train_local` (cross-entropy or adversarial loss, Jacobian and FedProx
  terms, anytime budgets, a simulated compute budget) and its :class:`TrainStats`;
- :mod:`~fedeq.train.evaluate`: :func:`evaluate` and the anytime curve :func:`accuracy_vs_budget`;
- :mod:`~fedeq.train.optimizers`: :func:`make_optimizer`, the ``torch.optim`` optimizer ``train.optimizer``
  names;
- :mod:`~fedeq.train.adversarial`: adversarial-training losses (PGD-AT, TRADES);
- :mod:`~fedeq.train.intermediate`: random intermediate states (training-time regulation of the dynamics);
- :mod:`~fedeq.train.entropy_defense`: entropy-reducing input updates (inference-time regulation);
- :mod:`~fedeq.train.device`: device resolution, moving models and data, seeding;
- :mod:`~fedeq.train.solver_stats`: what one model call cost its DEQ.
"""

from fedeq.train.adversarial import (
    ADVERSARIAL_MODES,
    AdversarialConfig,
    AdversarialStep,
    adversarial_from_config,
    adversarial_step,
)
from fedeq.train.device import examples_on, move_to, resolve_device, seed_global_rng
from fedeq.train.entropy_defense import (
    EntropyDefense,
    entropy_defense_fn,
    entropy_predictor,
    entropy_reduced_inputs,
)
from fedeq.train.evaluate import EvalStats, accuracy_vs_budget, evaluate
from fedeq.train.intermediate import RandomIntermediate, check_intermediate_states, intermediate_forward
from fedeq.train.local import TrainStats, squared_distance, train_local
from fedeq.train.optimizers import OPTIMIZERS, make_optimizer
from fedeq.train.solver_stats import solver_stats

__all__ = [
    "ADVERSARIAL_MODES",
    "OPTIMIZERS",
    "AdversarialConfig",
    "AdversarialStep",
    "EntropyDefense",
    "EvalStats",
    "RandomIntermediate",
    "TrainStats",
    "accuracy_vs_budget",
    "adversarial_from_config",
    "adversarial_step",
    "check_intermediate_states",
    "entropy_defense_fn",
    "entropy_predictor",
    "entropy_reduced_inputs",
    "evaluate",
    "examples_on",
    "intermediate_forward",
    "make_optimizer",
    "move_to",
    "resolve_device",
    "seed_global_rng",
    "solver_stats",
    "squared_distance",
    "train_local",
]
