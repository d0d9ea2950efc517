"""Quality functions of the quality-weighted average, one module each (τ = ``temperature``):

* ``residual``:   q = exp(-r/τ), r = ``fp-residual`` (mean relative fixed-point residual)
* ``budget``:     q = K_i / max_j K_j, K = ``budget`` (forward iteration budget of the tier)
* ``val_loss``:   q = exp(-ℓ/τ), ℓ = ``val-loss``
* ``uniform``:    q = 1
* ``server_val``: q = exp(-ℓ_i/τ), ℓ_i the loss of θ_i on the server's validation split
* ``agreement``:  q = max(0, cos(Δ_i, median_j Δ_j)), Δ_j = θ_j − θ
* ``nfe``:        q = W_i / max_j W_j, W = ``local-steps`` · (``nfe-fwd`` + ``nfe-bwd``)

These rules are fedeq's own. Gkillas et al. (arXiv 2305.18646) motivate weighting updates from
heterogeneous devices by their quality, but their exact fusion rule is not public in what we could read, so
none of these functions is their formula.

Importing this package registers them in :data:`fedeq.registry.QUALITY`; a plug-in adds its own with
:func:`register_quality`.
"""

from . import residual, budget, val_loss, uniform, server_val, agreement, nfe  # noqa: F401, I001  (order)
from .base import (
    NEEDS,
    QualityContext,
    QualityFn,
    QualityFunction,
    ServerEvaluate,
    quality_function,
    register_quality,
)

__all__ = [
    "NEEDS",
    "QualityContext",
    "QualityFn",
    "QualityFunction",
    "ServerEvaluate",
    "quality_function",
    "register_quality",
]
