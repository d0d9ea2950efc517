"""Model families (registered in :data:`fedeq.registry.MODELS`) and how to build them by name.

Importing this package registers the built-in families, in this order: ``mlp_deq``, ``conv_deq``,
``explicit``, ``mondeq``, ``conv_mondeq``, ``tied``, ``tied_sparse``, ``lyadeq``. A new family is one
module with a factory decorated by :func:`register_model`.
"""

from fedeq.models import mlp_deq as _mlp_deq  # noqa: I001  (import order = registration order)
from fedeq.models import conv_deq as _conv_deq
from fedeq.models import explicit as _explicit
from fedeq.models import mondeq as _mondeq
from fedeq.models import tied as _tied
from fedeq.models import lyadeq as _lyadeq
from fedeq.models.base import ModelFactory, ModelOutput, config_value, flattened_size, num_parameters
from fedeq.models.build import build_model, register_model
from fedeq.models.conv_deq import ConvDEQ
from fedeq.models.explicit import ExplicitMLP
from fedeq.models.lyadeq import LyaDEQ
from fedeq.models.mlp_deq import MLPDEQ
from fedeq.models.mondeq import ConvMonDEQ, MonDEQ
from fedeq.models.tied import TiedMLP

__all__ = [
    "ConvDEQ",
    "ConvMonDEQ",
    "ExplicitMLP",
    "LyaDEQ",
    "MLPDEQ",
    "ModelFactory",
    "ModelOutput",
    "MonDEQ",
    "TiedMLP",
    "build_model",
    "config_value",
    "flattened_size",
    "num_parameters",
    "register_model",
]

del _mlp_deq, _conv_deq, _explicit, _mondeq, _tied, _lyadeq
