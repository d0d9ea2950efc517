"""The ClientApp's personalised path (``personalization.method`` other than ``none``).

A train call loads the shared part from the message and the personal part from the node's
``context.state`` (:class:`~fedeq.personal.PersonalState`), trains with the method's schedule under the
tier's budgets, keeps the personal part in the state and replies with the shared part only. An evaluate
call measures the client's personalised model on its own test split (``data.client_test_fraction``), and
the global model too when the whole model travels.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedeq.arrays import record_to_state_dict
from fedeq.data import client_dataset, load_client_data
from fedeq.models import initial_model
from fedeq.personal import LocalJob, PersonalState, get_method, personal_keys
from fedeq.personal.memory import training_memory
from fedeq.train import EvalStats, TrainStats, evaluate, move_to

from .run_setup import TRAIN_SEED, ClientCall, RunSetup, call_seed

__all__ = ["FINETUNE_SEED", "initial_state", "personal_evaluate", "personal_train", "received_tensors"]

FINETUNE_SEED = 3
"""Stream of :meth:`~clients.run_setup.ClientCall.seed` for evaluation-time fine-tuning."""


@functools.lru_cache(maxsize=4)
def initial_state(setup: RunSetup) -> dict[str, torch.Tensor]:
    """The run's initial model (built under ``torch.manual_seed(seed)``): every personal part starts here."""
    splits = client_dataset(setup.cfg.data, setup.cfg.seed)
    with torch.random.fork_rng():
        model = initial_model(setup.cfg, splits.input_shape, splits.num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def received_tensors(message: Message) -> dict[str, torch.Tensor]:
    """The tensors the server sent (the shared part; empty for ``local``)."""
    arrays = message.content.array_records.get("arrays")
    return {} if arrays is None else record_to_state_dict(arrays)


def _job(call: ClientCall, seed: int, **train_extra: Any) -> LocalJob:
    setup, cfg = call.setup, call.cfg
    data = load_client_data(cfg.data, call.partition_id, call.num_partitions, cfg.seed)
    settings = cfg.personalization
    train = {
        **setup.train,
        "deq": setup.deq[call.tier_index],
        "device": setup.device,
        "adversarial": setup.adversarial,
        **train_extra,
    }
    keys = personal_keys(setup.model, settings.personal_modules)
    return LocalJob(setup.model, data, train, keys, initial_state(setup), settings, seed)


def personal_train(
    message: Message, context: Context, call: ClientCall, **train_extra: Any
) -> tuple[dict[str, torch.Tensor], TrainStats, EvalStats, dict[str, float]]:
    """Train this client with its method; return the tensors to send, the call's statistics, the
    personalised model's loss and accuracy on the local validation split (for the reply's ``val-*``) and the
    personalised metrics (``train-mem-bytes``: :func:`~fedeq.personal.memory.training_memory` of the call,
    ``personal-bytes``: the state kept on the device)."""
    method = get_method(call.cfg.personalization.method)
    job = _job(call, call.seed(TRAIN_SEED), **train_extra)
    state = PersonalState(context.state)
    try:
        sent, stats = method.train(job, received_tensors(message), state)
        method.load_update(job, sent)
        val = evaluate(
            job.model, job.data.x_val, job.data.y_val, device=job.train["device"], **job.train["deq"]
        )
    finally:
        move_to(job.model, "cpu")
    extra = {
        "train-mem-bytes": float(training_memory(job.model, job.train["optimizer"], job.activation_bytes)),
        "personal-bytes": float(state.nbytes()),
    }
    return sent, stats, val, extra


def personal_evaluate(message: Message, context: Context, call: ClientCall) -> Message:
    """Accuracy of the client's personalised model (and of the global one when the whole model travels) on
    its own test split, at its tier's DEQ settings."""
    method = get_method(call.cfg.personalization.method)
    job = _job(call, call_seed(call.cfg, call.server_round, call.partition_id, FINETUNE_SEED))
    received = received_tensors(message)
    state = PersonalState(context.state)
    x, y = job.data.x_test, job.data.y_test
    deq = job.train["deq"]
    device = job.train["device"]
    try:
        method.load_personal(job, received, state)
        mine = evaluate(job.model, x, y, device=device, **deq)
        metrics: dict[str, Any] = {
            "num-examples": max(mine.num_examples, 1),
            "test-examples": mine.num_examples,
            "personal-acc": _finite(mine, "accuracy"),
            "personal-loss": _finite(mine, "loss"),
            "tier": call.tier_index,
            "partition-id": call.partition_id,
        }
        if method.shares == "model":
            job.load(received)
            metrics["global-acc"] = _finite(evaluate(job.model, x, y, device=device, **deq), "accuracy")
    finally:
        move_to(job.model, "cpu")
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def _finite(stats: EvalStats, attr: str) -> float:
    return float(getattr(stats, attr)) if stats.num_examples else 0.0
