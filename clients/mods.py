"""ClientApp mods for the simulated device: availability, injected faults and the partial deadline.

Each mod is a Flower mod, ``mod(message, context, call_next) -> Message``, registered on the train handler
(``@app.train(mods=TRAIN_MODS)``), outermost first:

- :func:`availability_mod`: a device that is offline this round answers with a ``NODE_UNAVAILABLE`` error
  and does no work;
- :func:`fault_mod`: an injected fault raises or hangs before the work, or poisons the reply's arrays;
- :func:`partial_deadline_mod`: with ``devices.deadline_policy=partial``, tells the handler how many
  simulated compute seconds are left before the deadline (config key :data:`SIM_BUDGET_KEY`).

Every draw is seeded by the run seed, the round and the partition, so a run repeats exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedeq.devices.clock import client_sim_time
from fedeq.devices.faults import before_training, draw_fault, poison

from .run_setup import AVAILABILITY_SEED, FAULT_SEED, ClientCall, call_of

__all__ = [
    "SIM_BUDGET_KEY",
    "TRAIN_MODS",
    "availability_mod",
    "fault_mod",
    "is_online",
    "offline_reply",
    "partial_deadline_mod",
    "partial_work_budget",
]

SIM_BUDGET_KEY = "sim-budget-s"
"""Config key of the simulated compute seconds a train call may spend (from :func:`partial_deadline_mod`)."""


def is_online(call: ClientCall) -> bool:
    """Whether a sampled device answers this round: a seeded draw against its tier's availability."""
    tier = call.tier
    if tier.availability >= 1.0:
        return True
    return bool(np.random.default_rng(call.seed(AVAILABILITY_SEED)).random() < tier.availability)


def availability_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer ``NODE_UNAVAILABLE`` without any work when the device is offline this round."""
    call = call_of(message, context)
    if not is_online(call):
        return offline_reply(call, message)
    return call_next(message, context)


def offline_reply(call: ClientCall, message: Message) -> Message:
    """The ``NODE_UNAVAILABLE`` reply of a device that is offline this round."""
    tier = call.tier
    reason = (
        f"offline: partition {call.partition_id} ({tier.name}, availability {tier.availability:g}) "
        "not reachable"
    )
    return Message(Error(ErrorCode.NODE_UNAVAILABLE, reason), reply_to=message)


def fault_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inject the fault drawn for this call: raise or hang before the work, or reply with NaN arrays."""
    call = call_of(message, context)
    faults = call.cfg.faults
    fault = draw_fault(faults, call.seed(FAULT_SEED))
    before_training(fault, faults)
    reply = call_next(message, context)
    if fault == "nan" and reply.has_content() and "arrays" in reply.content.array_records:
        reply.content["arrays"] = poison(reply.content.array_records["arrays"])
    return reply


def partial_work_budget(call: ClientCall, message: Message) -> float | None:
    """With ``deadline_policy=partial``: the simulated compute seconds left before the deadline once the
    model's download and upload are paid for; ``None`` when training may run to the end."""
    devices = call.cfg.devices
    deadline = devices.deadline_s
    if deadline is None or devices.deadline_policy != "partial":
        return None
    nbytes = message.content.array_records["arrays"].count_bytes()
    comm = client_sim_time(
        call.tier, nfe_fwd=0, nfe_bwd=0, samples=0, bytes_down=nbytes, bytes_up=nbytes, nfe_cost_s=0.0
    ).comm_s
    return max(0.0, float(deadline) - comm)


def partial_deadline_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass the simulated compute budget of ``deadline_policy=partial`` to the handler in the config."""
    budget = partial_work_budget(call_of(message, context), message)
    if budget is not None:
        message.content = _with_config(message.content, {SIM_BUDGET_KEY: budget})
    return call_next(message, context)


def _with_config(content: RecordDict, entries: dict[str, Any]) -> RecordDict:
    """A copy of ``content`` (records shared) whose ``config`` record also holds ``entries``."""
    records = dict(content.items())
    records["config"] = ConfigRecord({**dict(content.config_records.get("config", {})), **entries})
    return RecordDict(records)


TRAIN_MODS: list[Mod] = [availability_mod, fault_mod, partial_deadline_mod]
"""The train handler's mods, outermost first."""
