"""The deterministic simulated clock of a device call.

For a client of tier ``t`` that processed ``S`` samples with ``F`` forward evaluations and ``K`` backward
vector-Jacobian products per sample (means over its steps)::

    compute = (F + K) · S · nfe_cost_s / t.speed
    comm    = 8·bytes_down / (t.bandwidth_down_mbps·10⁶)
            + 8·bytes_up / (t.bandwidth_up_mbps·10⁶) + 2·t.latency_s

and the call takes ``compute + comm`` simulated seconds. A round lasts as long as its slowest accepted client
(or the deadline, when one is set).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SimTime:
    compute_s: float
    comm_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


def client_sim_time(
    tier: Any,
    *,
    nfe_fwd: float,
    nfe_bwd: float,
    samples: float,
    bytes_down: int,
    bytes_up: int,
    nfe_cost_s: float,
) -> SimTime:
    """Simulated compute and communication seconds of one client call (see module docstring)."""
    compute = (nfe_fwd + nfe_bwd) * samples * nfe_cost_s / tier.speed
    comm = (
        8.0 * bytes_down / (tier.bandwidth_down_mbps * 1e6)
        + 8.0 * bytes_up / (tier.bandwidth_up_mbps * 1e6)
        + 2.0 * tier.latency_s
    )
    return SimTime(compute, comm)


def reply_sim_time(tier: Any, metrics: Mapping[str, Any], model_bytes: int, nfe_cost_s: float) -> float:
    """Simulated seconds of a client call from the metrics it reported (model down and up once)."""
    return client_sim_time(
        tier,
        nfe_fwd=float(metrics.get("nfe-fwd", 0.0)),
        nfe_bwd=float(metrics.get("nfe-bwd", 0.0)),
        samples=float(metrics.get("samples", metrics.get("num-examples", 0))),
        bytes_down=model_bytes,
        bytes_up=model_bytes,
        nfe_cost_s=nfe_cost_s,
    ).total_s
