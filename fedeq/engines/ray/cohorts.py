"""How the Ray grid groups a round's train messages into cohorts, and how large a cohort may be.

With ``ray.cohort_size`` other than 1, the train messages of one tier that a round sends are split, in
order, into cohorts; each cohort is one actor call answered by the vectorized cohort handler
(:mod:`clients.cohort_app`). ``auto`` splits a tier's clients of the round evenly over its share of its
pool's actors (a pool that serves several tiers shares its actors among them in proportion to their
work, at least one cohort per tier), capped so that a cohort fits in memory (:func:`cohort_cap`); an
integer fixes the size; 1 keeps one client per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import psutil
from flwr.app import Message, MessageType

__all__ = ["CohortSize", "auto_size", "cohort_cap", "cohort_caps", "group_calls", "split_cohorts"]

CohortSize = int | str
"""``"auto"`` or a number of clients per cohort (>= 1)."""

_MEMORY_SHARE = 0.25
"""Part of the memory available to an actor (its tier's ``memory_mb``, else the free memory of the
machine divided among the pool's actors) that one cohort may take."""
_MAX_AUTO = 512
"""The largest cohort ``auto`` forms."""


def split_cohorts(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in order, in consecutive groups of ``size`` (the last one may be smaller)."""
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def group_calls(
    messages: Sequence[Message],
    tiers: Sequence[int],
    cohort_size: CohortSize,
    pools: Sequence[int],
    actors: Sequence[int],
    caps: Sequence[int],
    costs: Sequence[float] | None = None,
) -> list[tuple[int, list[Message]]]:
    """The actor calls that answer ``messages`` (of tiers ``tiers``): ``(tier, messages)`` each.

    Train messages of a tier form cohorts; any other message, or every one with ``cohort_size=1``, is a
    call of its own, and those come first. ``pools`` gives each tier's pool, ``actors`` each pool's size,
    ``caps`` each tier's largest ``auto`` cohort, ``costs`` a tier's cost per client (its forward plus
    backward budget). With ``auto`` the actors of a pool are shared among its tiers in proportion to
    their work (clients × cost; at least one cohort per tier: :func:`auto_size`), and cohorts are sent
    most expensive first, so that the actors of a shared pool finish together.
    """
    calls: list[tuple[int, list[Message]]] = []
    cohorts: dict[int, list[Message]] = {}
    for msg, tier in zip(messages, tiers, strict=True):
        if cohort_size != 1 and msg.metadata.message_type == MessageType.TRAIN:
            cohorts.setdefault(tier, []).append(msg)
        else:
            calls.append((tier, [msg]))
    cost = list(costs) if costs is not None else [1.0] * (max(tiers, default=0) + 1)
    work = {tier: cost[tier] * len(msgs) for tier, msgs in cohorts.items()}
    in_pool: dict[int, float] = {}
    for tier, amount in work.items():
        in_pool[pools[tier]] = in_pool.get(pools[tier], 0.0) + amount
    grouped: list[tuple[int, list[Message]]] = []
    for tier, msgs in cohorts.items():
        if cohort_size == "auto":
            share = actors[pools[tier]] * work[tier] / in_pool[pools[tier]] if in_pool[pools[tier]] else 1.0
            size = auto_size(len(msgs), share, caps[tier])
        else:
            size = int(cohort_size)
        grouped += [(tier, group) for group in split_cohorts(msgs, size)]
    grouped.sort(key=lambda call: -cost[call[0]] * len(call[1]))  # stable: message order among equals
    return calls + grouped


def auto_size(clients: int, actors: float, cap: int) -> int:
    """``auto``: a tier's ``clients`` of the round in ``ceil(actors)`` even cohorts (at least one), each
    of at most ``cap`` clients (``actors``: the tier's share of its pool's actors)."""
    cohorts = max(1, math.ceil(actors - 1e-9))
    return max(1, min(cap, math.ceil(clients / cohorts)))


def client_bytes(num_params: int, state_numel: int, batch_size: int, samples: int, max_iter: int) -> int:
    """A generous estimate of the memory one client of a cohort needs, in bytes (float32).

    Its weights, gradient, optimizer moments, anchor and reply (6 copies of ``num_params``) plus, per
    training sample of a batch, the solver's history (``max_iter`` + 4 states of ``state_numel`` values,
    Anderson's and Broyden's being the largest) and its data (``samples`` values of training and
    validation data).
    """
    per_sample = (max_iter + 4) * state_numel
    return 4 * (6 * num_params + batch_size * per_sample + samples)


def cohort_cap(
    per_client_bytes: int, actors: int, memory_mb: float | None = None, gpu_bytes: float | None = None
) -> int:
    """The largest cohort one actor may run: ``_MEMORY_SHARE`` of its memory over ``per_client_bytes``.

    Its memory: ``gpu_bytes`` (its share of a GPU) for a GPU tier, else the tier's ``memory_mb``, else the
    machine's available memory divided among ``actors``."""
    if gpu_bytes:
        budget = float(gpu_bytes)
    elif memory_mb:
        budget = float(memory_mb) * 2**20
    else:
        budget = float(psutil.virtual_memory().available) / max(1, actors)
    return max(1, min(_MAX_AUTO, int(_MEMORY_SHARE * budget // max(1, per_client_bytes))))


def cohort_caps(cfg: Any, splits: Any, pool_sizes: Sequence[int]) -> list[int]:
    """:func:`cohort_cap` of every tier of ``cfg`` for data ``splits`` (``pool_sizes``: the actors of each
    tier's pool), from the model's parameter count and the size of one sample's equilibrium state."""
    import torch

    from fedeq.models import build_model
    from fedeq.models.classifier import DEQClassifier

    shape = tuple(splits.input_shape)
    model = build_model(cfg.model.name, shape, splits.num_classes, cfg.model)
    num_params = sum(p.numel() for p in model.parameters())
    state_numel = 0
    if isinstance(model, DEQClassifier):
        with torch.no_grad():
            state_numel = int(model.init_state(model.injection(torch.zeros(1, *shape))).numel())
    samples = math.prod(shape) * max(1, len(splits.y_train) // max(1, cfg.num_clients))
    caps = []
    for tier, actors in zip(cfg.devices.tiers, pool_sizes, strict=True):
        need = client_bytes(num_params, state_numel, cfg.train.batch_size, samples, int(tier.f_max_iter))
        gpu = None
        if tier.num_gpus and torch.cuda.is_available():  # the driver sees the GPU its actors share
            gpu = torch.cuda.get_device_properties(0).total_memory * min(1.0, float(tier.num_gpus))
        caps.append(cohort_cap(need, actors, getattr(tier, "memory_mb", None), gpu))
    return caps
