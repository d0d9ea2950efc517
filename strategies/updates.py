"""Model updates Δ_i = θ_i − θ as flat float64 vectors, and the normalised average of FedNova."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from fedeq.arrays import from_numpy, to_numpy

__all__ = ["flat_update", "is_floating", "normalized_average"]


def is_floating(array: Array) -> bool:
    """Whether an array holds real floating values, i.e. takes part in updates."""
    return np.dtype(array.dtype).kind == "f"


def flat_update(reply: ArrayRecord, global_arrays: ArrayRecord) -> np.ndarray:
    """Δ = θ_reply − θ over the floating arrays of ``global_arrays``, flattened in key order (float64)."""
    parts = [
        (to_numpy(reply[key]).astype(np.float64) - to_numpy(arr).astype(np.float64)).ravel()
        for key, arr in global_arrays.items()
        if is_floating(arr)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def normalized_average(
    global_arrays: ArrayRecord, replies: Sequence[ArrayRecord], p: Sequence[float], tau: Sequence[float]
) -> ArrayRecord:
    """θ + τ_eff Σ_i p_i Δ_i / τ_i with τ_eff = Σ_i p_i τ_i, per floating array (float64, dtype kept).

    ``p`` must sum to 1 and every τ_i be > 0. Non-floating arrays (counters) get the plain average
    Σ_i p_i θ_i, rounded.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    tau_arr = np.asarray(tau, dtype=np.float64)
    tau_eff = float(np.dot(p_arr, tau_arr))
    coef = p_arr * tau_eff / tau_arr
    out: dict[str, Array] = {}
    for key, arr in global_arrays.items():
        theta = to_numpy(arr)
        values = [to_numpy(r[key]).astype(np.float64) for r in replies]
        if is_floating(arr):
            base = theta.astype(np.float64)
            new = base + sum(c * (v - base) for c, v in zip(coef, values, strict=True))
        else:
            new = np.rint(sum(w * v for w, v in zip(p_arr, values, strict=True)))
        out[key] = from_numpy(np.asarray(np.asarray(new).astype(theta.dtype)).reshape(theta.shape))
    return ArrayRecord(out)
