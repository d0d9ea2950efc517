"""Flower ClientApp: local DEQ training and evaluation under the device tier's budgets.

The handlers train or evaluate with the call's tier: its solver, forward/backward budgets and backward mode
(:mod:`clients.run_setup` finds the run's config, the partition and the tier). What the simulated device does
around the work (being offline, injected faults, the partial deadline) is a mod of the train handler
(:mod:`clients.mods`).

Train replies carry ``arrays`` and a ``metrics`` record whose keys are the same for every client
(:data:`TRAIN_METRIC_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedeq.arrays import record_from_state_dict, record_to_state_dict
from fedeq.data import load_client_data
from fedeq.train import EvalStats, TrainStats, evaluate, move_to, train_local

from .mods import SIM_BUDGET_KEY, TRAIN_MODS
from .personal_app import personal_evaluate, personal_train
from .run_setup import TRAIN_SEED, ClientCall, call_of

__all__ = ["TRAIN_METRIC_KEYS", "app", "evaluate_handler", "proximal_mu", "train", "train_reply"]

TRAIN_METRIC_KEYS = (
    "num-examples",
    "train-loss",
    "fp-residual",
    "nfe-fwd",
    "nfe-bwd",
    "budget",
    "tier",
    "compute-s",
    "compute-cpu-s",
    "val-loss",
    "val-acc",
    "samples",
    "local-steps",
    "partition-id",
)

app = ClientApp()


def _load_arrays(model: nn.Module, message: Message) -> None:
    arrays = message.content.array_records["arrays"]
    model.load_state_dict(record_to_state_dict(arrays), strict=True)


@app.train(mods=TRAIN_MODS)
def train(message: Message, context: Context) -> Message:
    """Train the received global model on the local partition under this device's budgets (adversarially,
    through the tier's DEQ settings, when ``train.adversarial`` or ``train.intermediate_states`` is set);
    with ``personalization.method`` set, the method's schedule (:mod:`clients.personal_app`)."""
    call = call_of(message, context)
    setup, cfg, tier = call.setup, call.cfg, call.tier
    sim_budget = message.content.config_records.get("config", {}).get(SIM_BUDGET_KEY)
    deadline = {
        "sim_budget_s": None if sim_budget is None else float(sim_budget),
        "sim_cost_s": cfg.devices.nfe_cost_s / tier.speed,
    }
    if cfg.personalization.method != "none":
        mu = proximal_mu(call, message)
        sent, stats, val, extra = personal_train(message, context, call, proximal_mu=mu, **deadline)
        return train_reply(message, call, sent, stats, val, extra)
    data = load_client_data(cfg.data, call.partition_id, call.num_partitions, cfg.seed)
    model = setup.model
    _load_arrays(model, message)
    deq = setup.deq[call.tier_index]
    stats = train_local(
        model,
        data.x_train,
        data.y_train,
        **setup.train,
        deq=deq,
        proximal_mu=proximal_mu(call, message),
        seed=call.seed(TRAIN_SEED),
        device=setup.device,
        adversarial=setup.adversarial,
        **deadline,
    )
    val = evaluate(model, data.x_val, data.y_val, device=setup.device, **deq)
    move_to(model, "cpu")
    return train_reply(message, call, model.state_dict(), stats, val)


def proximal_mu(call: ClientCall, message: Message) -> float:
    """FedProx's ``μ`` of this call: the strategy's ``proximal-mu`` in the message, else the config's."""
    config = message.content.config_records.get("config", {})
    return float(config.get("proximal-mu", call.cfg.train.proximal_mu))


def train_reply(
    message: Message,
    call: ClientCall,
    state: Mapping[str, Any],
    stats: TrainStats,
    val: EvalStats,
    extra: Mapping[str, float] | None = None,
) -> Message:
    """The reply to a train ``message``: the trained weights ``state`` and the metrics of
    :data:`TRAIN_METRIC_KEYS` (the same for a client trained alone or in a cohort), plus ``extra`` ones."""
    metrics = {
        "num-examples": stats.num_examples,
        "train-loss": stats.loss,
        "fp-residual": stats.fp_residual,
        "nfe-fwd": stats.nfe_fwd,
        "nfe-bwd": stats.nfe_bwd,
        "budget": int(call.tier.f_max_iter),
        "tier": call.tier_index,
        "compute-s": stats.compute_s,
        "compute-cpu-s": stats.compute_cpu_s,
        "val-loss": val.loss if val.num_examples else stats.loss,
        "val-acc": val.accuracy if val.num_examples else 0.0,
        "samples": stats.samples_processed,
        "local-steps": stats.steps,
        "partition-id": call.partition_id,
        **(extra or {}),
    }
    arrays = record_from_state_dict(state)
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate()
def evaluate_handler(message: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split at this device's budget (with
    personalization: the client's personalised model on its own test split, :mod:`clients.personal_app`)."""
    call = call_of(message, context)
    setup = call.setup
    if setup.view.personalization.method != "none":
        return personal_evaluate(message, context, call)
    data = load_client_data(setup.view.data, call.partition_id, call.num_partitions, setup.view.seed)
    model = setup.model
    _load_arrays(model, message)
    st = evaluate(model, data.x_val, data.y_val, device=setup.device, **setup.deq[call.tier_index])
    move_to(model, "cpu")
    metrics = {
        "num-examples": max(st.num_examples, 1),
        "eval-loss": st.loss if st.num_examples else 0.0,
        "eval-acc": st.accuracy if st.num_examples else 0.0,
        "fp-residual": st.fp_residual if st.num_examples else 0.0,
        "tier": call.tier_index,
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
