"""Flower ClientApp: local DEQ training and evaluation under the device tier's budgets.

Each call reads the run's resolved fedeq config from the message (``config["fedeq-config"]``, sent by the
ServerApp; the run config is the fallback), finds its partition from the node config (``partition-id``,
``num-partitions``) and its device tier (node config ``tier`` by name, or the config's tier assignment), then
trains or evaluates with that tier's solver, forward/backward budgets and backward mode.

Train replies carry ``arrays`` and a ``metrics`` record whose keys are the same for every client
(:data:`TRAIN_METRIC_KEYS`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from omegaconf import OmegaConf
from torch import nn

from fedeq.arrays import record_from_state_dict, record_to_state_dict
from fedeq.config.core import (
    RUN_CONFIG_KEY,
    assign_tiers,
    attribute_view,
    config_from_run_config,
    config_from_yaml,
)
from fedeq.data.core import load_client_data, load_dataset
from fedeq.devices.clock import client_sim_time
from fedeq.devices.faults import before_training, draw_fault, poison
from fedeq.models.core import build_model
from fedeq.train.adversarial import adversarial_from_config
from fedeq.train.local import evaluate, move_to, resolve_device, train_local

TRAIN_METRIC_KEYS = (
    "num-examples",
    "train-loss",
    "fp-residual",
    "nfe-fwd",
    "nfe-bwd",
    "budget",
    "tier",
    "compute-s",
    "compute-cpu-s",
    "val-loss",
    "val-acc",
    "samples",
    "partition-id",
)

app = ClientApp()


class RunSetup:
    """Everything a call needs from one run's config, read once per process and config.

    ``cfg`` is the validated OmegaConf config; ``view`` holds the same values as plain attributes.
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


def _setup_of(message: Message, context: Context) -> RunSetup:
    """The run's setup: from the config the server sent with the message, else from the run config."""
    cfg_record = message.content.config_records.get("config")
    if cfg_record is not None and RUN_CONFIG_KEY in cfg_record:
        return _setup_from_text(str(cfg_record[RUN_CONFIG_KEY]))
    return _setup_from_run_config(tuple(sorted(context.run_config.items())))


def tier_deq_settings(cfg: Any, tier: Any) -> dict[str, Any]:
    """DEQ overrides of a tier: solver, budgets, backward mode and the model's tolerance."""
    return {
        "solver": tier.solver,
        "f_max_iter": int(tier.f_max_iter),
        "b_max_iter": int(tier.b_max_iter),
        "backward": tier.backward,
        "tol": float(cfg.model.tol),
        "stop_mode": cfg.model.stop_mode,
    }


@functools.lru_cache(maxsize=4)
def _cached_model(key: tuple) -> nn.Module:
    name, shape, classes, cfg_items = key
    return build_model(name, shape, classes, SimpleNamespace(**dict(cfg_items)))


def model_for(cfg: Any) -> nn.Module:
    """A model of the configured architecture, reused across calls in this process (weights get replaced)."""
    splits = load_dataset(cfg.data.name, cfg.data.path, cfg.data.test_path, cfg.data.test_fraction, cfg.seed)
    items = tuple(sorted((k, v) for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"))
    return _cached_model((cfg.model.name, tuple(splits.input_shape), splits.num_classes, items))


def _context(message: Message, context: Context) -> tuple[RunSetup, int, int, int, Any]:
    setup = _setup_of(message, context)
    node_config = context.node_config
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", setup.view.num_clients))
    tier_idx = setup.tier_index(node_config, partition_id)
    return setup, partition_id, num_partitions, tier_idx, setup.view.devices.tiers[tier_idx]


def _load_arrays(model: nn.Module, message: Message) -> None:
    arrays = message.content.array_records["arrays"]
    model.load_state_dict(record_to_state_dict(arrays), strict=True)


def _seed(cfg: Any, server_round: int, partition_id: int, stream: int) -> int:
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


def is_online(cfg: Any, tier: Any, server_round: int, partition_id: int) -> bool:
    """Whether a sampled device answers this round: a seeded draw against its tier's availability."""
    if tier.availability >= 1.0:
        return True
    return bool(np.random.default_rng(_seed(cfg, server_round, partition_id, 1)).random() < tier.availability)


def partial_work_budget(cfg: Any, tier: Any, message: Message) -> float | None:
    """With ``deadline_policy=partial``: the simulated compute seconds left before the deadline once the
    model's download and upload are paid for; ``None`` when training may run to the end."""
    deadline = cfg.devices.deadline_s
    if deadline is None or cfg.devices.deadline_policy != "partial":
        return None
    nbytes = message.content.array_records["arrays"].count_bytes()
    comm = client_sim_time(
        tier, nfe_fwd=0, nfe_bwd=0, samples=0, bytes_down=nbytes, bytes_up=nbytes, nfe_cost_s=0.0
    ).comm_s
    return max(0.0, float(deadline) - comm)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received global model on the local partition under this device's budgets (adversarially,
    through the tier's DEQ settings, when ``train.adversarial`` or ``train.intermediate_states`` is set)."""
    setup, pid, num_parts, tier_idx, tier = _context(message, context)
    cfg = setup.view
    config = message.content.config_records.get("config", {})
    server_round = int(config.get("server-round", 0))
    if not is_online(cfg, tier, server_round, pid):
        reason = f"offline: partition {pid} ({tier.name}, availability {tier.availability:g}) not reachable"
        return Message(Error(ErrorCode.NODE_UNAVAILABLE, reason), reply_to=message)
    fault = draw_fault(cfg.faults, _seed(cfg, server_round, pid, 2))
    before_training(fault, cfg.faults)
    data = load_client_data(cfg.data, pid, num_parts, cfg.seed)
    device = setup.device
    model = setup.model
    _load_arrays(model, message)
    deq = setup.deq[tier_idx]
    mu = float(config.get("proximal-mu", cfg.train.proximal_mu))
    sim_budget = partial_work_budget(cfg, tier, message)
    stats = train_local(
        model,
        data.x_train,
        data.y_train,
        **setup.train,
        deq=deq,
        proximal_mu=mu,
        seed=_seed(cfg, server_round, pid, 0),
        device=device,
        adversarial=setup.adversarial,
        sim_budget_s=sim_budget,
        sim_cost_s=cfg.devices.nfe_cost_s / tier.speed,
    )
    val = evaluate(model, data.x_val, data.y_val, device=device, **deq)
    move_to(model, "cpu")
    metrics = {
        "num-examples": stats.num_examples,
        "train-loss": stats.loss,
        "fp-residual": stats.fp_residual,
        "nfe-fwd": stats.nfe_fwd,
        "nfe-bwd": stats.nfe_bwd,
        "budget": int(tier.f_max_iter),
        "tier": tier_idx,
        "compute-s": stats.compute_s,
        "compute-cpu-s": stats.compute_cpu_s,
        "val-loss": val.loss if val.num_examples else stats.loss,
        "val-acc": val.accuracy if val.num_examples else 0.0,
        "samples": stats.samples_processed,
        "partition-id": pid,
    }
    state = model.state_dict()
    if fault == "nan":
        poison(state)
    content = RecordDict({"arrays": record_from_state_dict(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate_handler(message: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split at this device's budget."""
    setup, pid, num_parts, tier_idx, _ = _context(message, context)
    data = load_client_data(setup.view.data, pid, num_parts, setup.view.seed)
    model = setup.model
    _load_arrays(model, message)
    st = evaluate(model, data.x_val, data.y_val, device=setup.device, **setup.deq[tier_idx])
    move_to(model, "cpu")
    metrics = {
        "num-examples": max(st.num_examples, 1),
        "eval-loss": st.loss if st.num_examples else 0.0,
        "eval-acc": st.accuracy if st.num_examples else 0.0,
        "fp-residual": st.fp_residual if st.num_examples else 0.0,
        "tier": tier_idx,
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
