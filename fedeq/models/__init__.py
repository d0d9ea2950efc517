"""Model families (registered in :data:`fedeq.registry.MODELS`) and how to build them by name.

Importing this package registers the built-in families, in this order: ``mlp_deq``, ``conv_deq``,
``explicit``, ``mondeq``, ``conv_mondeq``, ``tied``, ``tied_sparse``, ``tied_conv``, ``potential_deq``,
``lyadeq``. A new family is one module with a factory
``factory(input_shape, num_classes, cfg, **kwargs) -> nn.Module`` decorated by :func:`register_model` (or
named ``package.module:factory`` in ``model.name``); a DEQ model is most easily a :class:`DEQClassifier`
subclass that writes its cell. See docs/custom_models.md.
"""

from fedeq.models import mlp_deq as _mlp_deq  # noqa: I001  (import order = registration order)
from fedeq.models import conv_deq as _conv_deq
from fedeq.models import explicit as _explicit
from fedeq.models import mondeq as _mondeq
from fedeq.models import tied as _tied
from fedeq.models import tied_conv as _tied_conv
from fedeq.models import potential_deq as _potential_deq
from fedeq.models import lyadeq as _lyadeq
from fedeq.models.base import (
    DEQParts,
    ModelFactory,
    ModelOutput,
    config_value,
    flattened_size,
    num_parameters,
    set_deq_settings,
)
from fedeq.models.build import build_model, initial_model, model_kwargs, register_model
from fedeq.models.classifier import DEQClassifier
from fedeq.models.conv_deq import ConvDEQ
from fedeq.models.explicit import ExplicitMLP
from fedeq.models.lyadeq import LyaDEQ
from fedeq.models.mlp_deq import MLPDEQ
from fedeq.models.mondeq import ConvMonDEQ, MonDEQ
from fedeq.models.potential_deq import PotentialDEQ
from fedeq.models.tied import TiedMLP
from fedeq.models.tied_conv import TiedConv

__all__ = [
    "ConvDEQ",
    "ConvMonDEQ",
    "DEQClassifier",
    "DEQParts",
    "ExplicitMLP",
    "LyaDEQ",
    "MLPDEQ",
    "ModelFactory",
    "ModelOutput",
    "MonDEQ",
    "PotentialDEQ",
    "TiedConv",
    "TiedMLP",
    "build_model",
    "initial_model",
    "config_value",
    "flattened_size",
    "model_kwargs",
    "num_parameters",
    "register_model",
    "set_deq_settings",
]

del _mlp_deq, _conv_deq, _explicit, _mondeq, _tied, _tied_conv, _lyadeq, _potential_deq
