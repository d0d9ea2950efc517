"""The DEQ settings a device tier trains and evaluates with."""

from __future__ import annotations

from typing import Any

__all__ = ["tier_deq_settings"]


def tier_deq_settings(cfg: Any, tier: Any) -> dict[str, Any]:
    """DEQ overrides of a tier: solver, budgets, backward mode and the model's tolerance.

    ``cfg`` is the run config (or an attribute view of it), ``tier`` one of ``cfg.devices.tiers``.
    """
    return {
        "solver": tier.solver,
        "f_max_iter": int(tier.f_max_iter),
        "b_max_iter": int(tier.b_max_iter),
        "backward": tier.backward,
        "tol": float(cfg.model.tol),
        "stop_mode": cfg.model.stop_mode,
    }
