"""What a ClientApp call needs from its run's config, built once per process and config.

A call finds its run's config in the message (``config["fedeq-config"]``, sent by the ServerApp; the run
config is the fallback), its partition in the node config (``partition-id``, ``num-partitions``) and its
device tier (node config ``tier`` by name, or the config's tier assignment). :func:`call_of` gathers all
of it; the parsed config, its attribute view, the tiers' DEQ settings and the model are cached per process.
"""

from __future__ import annotations

import functools
import json
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from torch import nn

from fedeq.config import RUN_CONFIG_KEY, attribute_view, config_from_run_config, config_from_yaml
from fedeq.data import client_dataset
from fedeq.devices.assign import assign_tiers
from fedeq.devices.settings import tier_deq_settings
from fedeq.models import build_model
from fedeq.train import adversarial_from_config, resolve_device

__all__ = ["ClientCall", "RunSetup", "call_of", "call_seed", "model_for", "setup_of", "train_options"]

TRAIN_SEED, AVAILABILITY_SEED, FAULT_SEED = 0, 1, 2
"""Streams of :func:`call_seed`: local training, the availability draw, the fault draw."""


class RunSetup:
    """Everything a call needs from one run's config, read once per process and config.

    ``cfg`` is the validated config; ``view`` holds the same values as plain attributes.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.view = attribute_view(cfg)
        self.tier_names = [t.name for t in self.view.devices.tiers]
        self.deq = [tier_deq_settings(self.view, t) for t in self.view.devices.tiers]
        self.train = train_options(self.view)
        self.adversarial = adversarial_from_config(self.view.train)
        self.device = resolve_device(self.view.train.device)
        self.model = model_for(cfg)
        self._assignment: list[int] | None = None

    def tier_index(self, node_config: Mapping[str, Any], partition_id: int) -> int:
        """Tier of a node: node config ``tier`` (a name) wins, else the config's assignment of ids."""
        if "tier" in node_config:
            name = str(node_config["tier"])
            if name not in self.tier_names:
                raise ValueError(
                    f"node config tier: unknown tier {name!r}; allowed: {', '.join(self.tier_names)}"
                )
            return self.tier_names.index(name)
        if self._assignment is None:
            self._assignment = assign_tiers(self.cfg)
        return self._assignment[partition_id % self.view.num_clients]


@functools.lru_cache(maxsize=8)
def _setup_from_text(text: str) -> RunSetup:
    return RunSetup(config_from_yaml(text))


@functools.lru_cache(maxsize=8)
def _setup_from_run_config(items: tuple[tuple[str, Any], ...]) -> RunSetup:
    return RunSetup(config_from_run_config(dict(items)))


def setup_of(message: Message, context: Context) -> RunSetup:
    """The run's setup: from the config the server sent with the message, else from the run config."""
    cfg_record = message.content.config_records.get("config")
    if cfg_record is not None and RUN_CONFIG_KEY in cfg_record:
        return _setup_from_text(str(cfg_record[RUN_CONFIG_KEY]))
    return _setup_from_run_config(tuple(sorted(context.run_config.items())))


@dataclass(frozen=True)
class ClientCall:
    """One call of the ClientApp: its run's setup, partition, device tier and round."""

    setup: RunSetup
    partition_id: int
    num_partitions: int
    tier_index: int
    server_round: int

    @property
    def cfg(self) -> Any:
        """The run config as plain attributes (:attr:`RunSetup.view`)."""
        return self.setup.view

    @property
    def tier(self) -> Any:
        """The device tier of this call (from :attr:`cfg`)."""
        return self.setup.view.devices.tiers[self.tier_index]

    def seed(self, stream: int) -> int:
        """The seed of one random stream of this call (see :func:`call_seed`)."""
        return call_seed(self.cfg, self.server_round, self.partition_id, stream)


def call_of(message: Message, context: Context) -> ClientCall:
    """Gather what ``message`` and the node's ``context`` say about this call.

    Raises ``ValueError`` naming the allowed tiers when the node config names an unknown one.
    """
    setup = setup_of(message, context)
    node_config = context.node_config
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", setup.view.num_clients))
    tier_index = setup.tier_index(node_config, partition_id)
    config = message.content.config_records.get("config", {})
    server_round = int(config.get("server-round", 0))
    return ClientCall(setup, partition_id, num_partitions, tier_index, server_round)


def call_seed(cfg: Any, server_round: int, partition_id: int, stream: int) -> int:
    """A seed that depends only on the run seed, the round, the partition and the stream."""
    return zlib.crc32(f"{cfg.seed}/{server_round}/{partition_id}/{stream}".encode())


def train_options(cfg: Any) -> dict[str, Any]:
    """The ``train_local`` keyword arguments that come straight from ``cfg.train``."""
    t = cfg.train
    return {
        "epochs": t.local_epochs,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer,
        "weight_decay": t.weight_decay,
        "jac_reg": t.jac_reg,
        "jac_reg_samples": t.jac_reg_samples,
        "randomize_budget": t.randomize_budget,
    }


_MODELS: dict[str, nn.Module] = {}
_MODELS_LOCK = threading.Lock()
_MODELS_KEPT = 4


def model_for(cfg: Any) -> nn.Module:
    """A model of the configured architecture, reused across calls in this process (weights get replaced).

    Runs whose ``model`` sections and data shapes agree share one model object (the last few are kept).
    """
    splits = client_dataset(cfg.data, cfg.seed)
    shape = tuple(splits.input_shape)
    key = json.dumps([shape, splits.num_classes, cfg.model.model_dump(mode="json")], sort_keys=True)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = build_model(cfg.model.name, shape, splits.num_classes, cfg.model)
            _MODELS[key] = model
            while len(_MODELS) > _MODELS_KEPT:
                del _MODELS[next(iter(_MODELS))]
    return model
