"""Which device tier each client belongs to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from fedeq.config import FedeqConfig, validate

__all__ = ["assign_tiers"]


def _largest_remainder(shares: Sequence[float], total: int) -> list[int]:
    """Integer quotas summing to ``total``, proportional to ``shares`` (ties -> lower index)."""
    norm = math.fsum(shares)
    exact = [s * total / norm for s in shares]
    quotas = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - quotas[i]), i))
    left = total - sum(quotas)
    for i in order[: max(left, 0)]:
        quotas[i] += 1
    for i in reversed(order):  # only when float slack over-allocated
        if left >= 0:
            break
        if quotas[i] > 0:
            quotas[i] -= 1
            left += 1
    return quotas


def _interleave(quotas: Sequence[int]) -> list[int]:
    """Order tier slots so every tier is spread evenly: slot ``k`` of a tier with quota ``q``
    is due at ``(k + 1/2) / q``; slots are emitted by due time, ties to the lower tier index."""
    taken = [0] * len(quotas)
    out: list[int] = []
    for _ in range(sum(quotas)):
        j = min(
            (i for i, q in enumerate(quotas) if taken[i] < q),
            key=lambda i: (Fraction(2 * taken[i] + 1, 2 * quotas[i]), i),
        )
        taken[j] += 1
        out.append(j)
    return out


def assign_tiers(cfg: FedeqConfig) -> list[int]:
    """Tier index of every client id ``0..num_clients-1`` (deterministic).

    Clients listed in a tier's ``ids`` go to that tier. The remaining clients, in increasing id
    order, are split over the tiers without ``ids``: each tier gets ``share * M`` clients (``M`` =
    number of remaining clients) rounded by the largest-remainder method (ties to the lower tier
    index), and the tiers are interleaved so each one is spread evenly over the id range (four
    equal tiers give ``0, 1, 2, 3, 0, 1, 2, 3, ...``).
    """
    cfg = validate(cfg)
    n = cfg.num_clients
    tiers = cfg.devices.tiers
    result = [-1] * n
    for t, tier in enumerate(tiers):
        for cid in tier.ids or ():
            result[cid] = t
    remaining = [cid for cid in range(n) if result[cid] < 0]
    share_tiers = [t for t, tier in enumerate(tiers) if tier.ids is None]
    if remaining:
        quotas = _largest_remainder([tiers[t].share for t in share_tiers], len(remaining))
        for cid, slot in zip(remaining, _interleave(quotas), strict=True):
            result[cid] = share_tiers[slot]
    return result
