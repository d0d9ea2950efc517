"""The train handler for a cohort: many train messages of one device tier answered by one vectorized run.

:func:`train_cohort_messages` gives every message the reply the ClientApp's train handler
(:func:`clients.client_app.train`, with its mods) would give it alone, using the same pieces:

- a device that is offline this round answers ``NODE_UNAVAILABLE`` (:func:`~clients.mods.is_online`);
- an injected fault is drawn from the same seed: ``raise`` answers the same error; ``hang`` answers the
  grid's timeout error when ``ray.call_timeout_s`` is shorter than ``faults.hang_s`` (the call would be
  stopped there) and otherwise trains without sleeping; ``nan`` poisons the reply's arrays;
- ``deadline_policy=partial`` gives each client its own simulated compute budget;
- the others train together (:func:`fedeq.train.cohort.train_cohort`), each from the weights in its own
  message, with its own seed and FedProx ``μ``, and are validated together
  (:func:`~fedeq.train.cohort.evaluate_cohort`).

When the run's model or training options cannot be vectorized (:func:`~fedeq.train.cohort.cohort_problem`)
every message goes through the ordinary ClientApp instead, and one line says why (once per process and
reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flwr.app import Context, Message

from fedeq.arrays import record_to_state_dict
from fedeq.data import load_client_data
from fedeq.devices.faults import before_training, draw_fault, exception_reply, poison, timeout_reply
from fedeq.train.cohort import CohortClient, cohort_problem, evaluate_cohort, train_cohort

from .client_app import proximal_mu, train_reply
from .mods import is_online, offline_reply, partial_work_budget
from .run_setup import FAULT_SEED, TRAIN_SEED, ClientCall, call_of

__all__ = ["train_cohort_messages"]

log = logging.getLogger("fedeq.cohort")
_REPORTED: set[str] = set()

Handler = Callable[[Message, Context], Message]


def train_cohort_messages(
    messages: Sequence[Message], contexts: Sequence[Context], single: Handler
) -> list[Message]:
    """The replies to train ``messages`` (one per simulated device, with its ``contexts``), in order.

    ``single(message, context)`` is the ordinary ClientApp: it answers every message when the run cannot
    be vectorized.
    """
    calls = [call_of(m, c) for m, c in zip(messages, contexts, strict=True)]
    setup = calls[0].setup
    tier_deq = setup.deq[calls[0].tier_index]
    problem = cohort_problem(setup.model, deq=tier_deq, adversarial=setup.adversarial, **setup.train)
    if setup.view.personalization.method != "none":
        problem = f"personalised training (personalization.method={setup.view.personalization.method})"
    if problem is not None:
        if problem not in _REPORTED:
            _REPORTED.add(problem)
            log.warning("cohorts: training one client at a time: %s cannot be vectorized", problem)
        return [single(m, c) for m, c in zip(messages, contexts, strict=True)]
    replies: list[Message | None] = [None] * len(messages)
    tiers: dict[int, list[int]] = {}
    faults: dict[int, str | None] = {}
    for i, (message, call) in enumerate(zip(messages, calls, strict=True)):
        early, faults[i] = _before_work(message, call)
        if early is not None:
            replies[i] = early
        else:
            tiers.setdefault(call.tier_index, []).append(i)
    for members in tiers.values():
        answers = _train_members([messages[i] for i in members], [calls[i] for i in members])
        for i, reply in zip(members, answers, strict=True):
            replies[i] = reply
    for i, reply in enumerate(replies):
        assert reply is not None
        if faults[i] == "nan" and reply.has_content() and "arrays" in reply.content.array_records:
            reply.content["arrays"] = poison(reply.content.array_records["arrays"])
    return [r for r in replies if r is not None]


def _before_work(message: Message, call: ClientCall) -> tuple[Message | None, str | None]:
    """The reply of a device that does no work (offline, a raising or hanging fault), else ``None``; and
    the fault drawn for it (the train handler's mods, outermost first)."""
    if not is_online(call):
        return offline_reply(call, message), None
    fault = draw_fault(call.cfg.faults, call.seed(FAULT_SEED))
    limit = call.cfg.ray.call_timeout_s
    if fault == "hang":
        if limit is not None and float(call.cfg.faults.hang_s) >= float(limit):
            return timeout_reply(message, float(limit)), fault
        return None, fault
    try:
        before_training(fault, call.cfg.faults)
    except Exception as err:  # noqa: BLE001 - the injected fault becomes an error reply
        return exception_reply(message, err), fault
    return None, fault


def _train_members(messages: Sequence[Message], calls: Sequence[ClientCall]) -> list[Message]:
    """Train the devices of one tier together; their replies, in order."""
    setup = calls[0].setup
    cfg, tier = calls[0].cfg, calls[0].tier
    deq = setup.deq[calls[0].tier_index]
    data = [load_client_data(cfg.data, c.partition_id, c.num_partitions, cfg.seed) for c in calls]
    members = [
        CohortClient(
            d.x_train,
            d.y_train,
            record_to_state_dict(m.content.array_records["arrays"]),
            seed=c.seed(TRAIN_SEED),
            proximal_mu=proximal_mu(c, m),
            sim_budget_s=partial_work_budget(c, m),
        )
        for m, c, d in zip(messages, calls, data, strict=True)
    ]
    stacked, stats = train_cohort(
        setup.model,
        members,
        **setup.train,
        deq=deq,
        device=setup.device,
        sim_cost_s=cfg.devices.nfe_cost_s / tier.speed,
    )
    vals = evaluate_cohort(stacked, [(d.x_val, d.y_val) for d in data], device=setup.device, **deq)
    return [
        train_reply(m, c, {k: v.cpu() for k, v in stacked.state_dict(i).items()}, stats[i], vals[i])
        for i, (m, c) in enumerate(zip(messages, calls, strict=True))
    ]
