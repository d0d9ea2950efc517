"""Quality functions of the quality-weighted average, one module each (τ = ``temperature``):

* ``residual``: q = exp(-r/τ), r = ``fp-residual`` (mean relative fixed-point residual)
* ``budget``:   q = K_i / max_j K_j, K = ``budget`` (forward iteration budget of the tier)
* ``val_loss``: q = exp(-ℓ/τ), ℓ = ``val-loss``
* ``uniform``:  q = 1

These rules are fedeq's own. Gkillas et al. (arXiv 2305.18646) motivate weighting updates from
heterogeneous devices by their quality, but their exact fusion rule is not public in what we could read, so
none of these functions is their formula.

Importing this package registers them in :data:`fedeq.registry.QUALITY`; a plug-in adds its own with
:func:`register_quality`.
"""

from . import residual, budget, val_loss, uniform  # noqa: F401, I001  (import order = registration order)
from .base import QualityContext, QualityFn, QualityFunction, quality_function, register_quality

__all__ = ["QualityContext", "QualityFn", "QualityFunction", "quality_function", "register_quality"]
