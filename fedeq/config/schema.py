"""The ``fedeq simulate`` configuration schema (:class:`FedeqConfig` at the root).

Its defaults are the embedded default run: the ``digits`` data set split over 20 clients with a
Dirichlet(0.5) partition, four device tiers with solver budgets from 2 to 30 iterations, and 20 rounds.
Names of registered things (engine, data set, partitioner, model family, solver, backward mode) are
checked against :mod:`fedeq.registry` when a config is validated.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fedeq.config.data import DataConfig
from fedeq.config.model_factory import check_model_kwargs, check_model_name
from fedeq.config.personalization import PersonalizationConfig
from fedeq.config.rules import Float, Int, Section, StrKeys, check_range, problem, registered_name
from fedeq.config.tiers import DevicesConfig, check_client_ids
from fedeq.registry import ENGINES

__all__ = [
    "AdversarialMode",
    "AsyncConfig",
    "AttackNorm",
    "DataConfig",
    "Device",
    "EvalConfig",
    "FaultConfig",
    "FedeqConfig",
    "MaskPattern",
    "ModelConfig",
    "Optimizer",
    "RayConfig",
    "StopMode",
    "StrategyConfig",
    "TrainConfig",
]

StopMode = Literal["abs", "rel"]
MaskPattern = Literal["unstructured", "row"]
Optimizer = Literal["adam", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
AdversarialMode = Literal["none", "pgd", "trades"]
AttackNorm = Literal["linf", "l2"]

_STRATEGY_NAME_RE = re.compile(r"^[A-Za-z_]\w*$|^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$", re.ASCII)


class ModelConfig(Section):
    """Model family and its size / solver tolerance."""

    name: str = "mlp_deq"
    """A registered model family or ``package.module:factory`` (docs/custom_models.md)."""
    kwargs: StrKeys = Field(default_factory=dict)
    """Keyword options of the model's factory, checked against its signature."""
    hidden: Int = Field(64, ge=1)
    """Width of the equilibrium state of the MLP families (mlp_deq, tied, mondeq, explicit)."""
    channels: Int = Field(16, ge=1)
    """conv_deq: channels of the equilibrium state."""
    depth: Int = Field(3, ge=1)
    """Layers of the explicit and weight-tied families (tied, explicit)."""
    downsample: Int = Field(1, ge=0, le=4)
    """conv_deq: stride-2 stages in the stem (the equilibrium runs at H / 2^downsample)."""
    blocks: Int = Field(1, ge=1, le=8)
    """conv_deq: residual blocks in the equilibrium cell (its depth)."""
    expansion: Int = Field(1, ge=1, le=8)
    """conv_deq: inner width multiplier of each residual block."""
    readout_grid: Int = Field(4, ge=1, le=16)
    """conv_deq: side of the pooled grid the linear readout sees."""
    tol: Float = Field(1e-4, gt=0)
    """Solver tolerance on the fixed-point residual (see ``stop_mode``)."""
    stop_mode: StopMode = "rel"
    """``abs`` | ``rel``: the residual the tolerance applies to (``rel``: divided by ``||f(z)||``)."""
    monotone_m: Float = Field(1.0, gt=0, le=1)
    """mondeq: strong-monotonicity margin m of W = (1 - m) I - AᵀA + B - Bᵀ."""
    mask_density: Float = Field(0.5, gt=0, le=1)
    """tied_sparse: fraction of kept weights in each layer's mask."""
    mask_pattern: MaskPattern = "unstructured"
    """tied_sparse: unstructured (entries) | row (output units)."""
    mask_seed: Int = Field(0, ge=0)
    """tied_sparse: seed of the per-layer masks."""

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        check_model_name(name)
        return name

    @model_validator(mode="after")
    def _factory_options(self) -> ModelConfig:
        check_model_kwargs(self.name, self.kwargs)
        return self


class TrainConfig(Section):
    """Local training hyper-parameters."""

    local_epochs: Int = Field(3, ge=1)
    """Passes over the client's data per train call."""
    lr: Float = Field(0.01, gt=0)
    """Learning rate of the local optimizer."""
    batch_size: Int = Field(32, ge=1)
    """Examples per local training step."""
    optimizer: Optimizer = "adam"
    """Local optimizer: ``adam`` | ``sgd``."""
    weight_decay: Float = Field(0.0, ge=0)
    """L2 weight decay of the local optimizer."""
    device: Device = "auto"
    """Where clients and the server compute: ``auto`` (CUDA when available) | ``cpu`` | ``cuda``."""
    jac_reg: Float = Field(0.0, ge=0)
    """Weight of the Jacobian (Frobenius norm) regularizer; 0: off."""
    jac_reg_samples: Int = Field(1, ge=1)
    """Random vectors of the regularizer's Hutchinson estimate."""
    randomize_budget: bool = False
    """Draw each step's forward budget uniformly from 1..the tier's ``f_max_iter``."""
    proximal_mu: Float = Field(0.0, ge=0)
    """Weight of the FedProx proximal term; 0: off."""
    adversarial: AdversarialMode = "none"
    """Local adversarial training: ``none`` | ``pgd`` (PGD-AT) | ``trades``."""
    epsilon: Float = 0.1
    """Attack radius: >= 0, and > 0 with adversarial training."""
    attack_steps: Int = Field(5, ge=1)
    """PGD steps of the attack."""
    attack_step_size: Float | None = Field(None, gt=0)
    """PGD step; ``null`` = 2.5·epsilon/attack_steps."""
    attack_norm: AttackNorm = "linf"
    """Norm ball of the attack: ``linf`` | ``l2``."""
    trades_beta: Float = Field(6.0, ge=0)
    """TRADES: weight of the robustness term."""
    intermediate_states: bool = False
    """Random intermediate states (Yang et al.): every forward of a training step at its own random solver
    state, with the unrolled gradient; needs a model with an exposed equilibrium map (checked before a
    run)."""

    @model_validator(mode="after")
    def _epsilon(self) -> TrainConfig:
        check_range(self.epsilon, 0.0, low_open=self.adversarial != "none", at=("epsilon",))
        return self


class StrategyConfig(Section):
    """Server strategy: a built-in name or ``package.module:ClassName`` plus constructor kwargs."""

    name: str = "quality"
    """A built-in strategy (``fedavg``, ``quality``, ``fedprox``, ...) or ``package.module:ClassName``."""
    kwargs: StrKeys = Field(default_factory=dict)
    """Keyword arguments of the strategy's constructor."""
    fraction_evaluate: Float = Field(0.0, ge=0, le=1)
    """Share of the clients that evaluate the global model each round (0: none)."""
    min_available_nodes: Int | None = None
    """Connected nodes a round waits for before sampling (null: ``num_clients``; else in 1..num_clients);
    lower it on a real deployment so rounds go on after a device dropped out."""
    round_timeout_s: Float | None = Field(None, gt=0)
    """Seconds the server waits for a round's replies (null: Flower's default of 3600)."""

    @field_validator("name")
    @classmethod
    def _name_form(cls, name: str) -> str:
        if not _STRATEGY_NAME_RE.match(name):
            allowed = "a built-in name (identifier) or package.module:ClassName"
            raise problem("malformed strategy name", allowed)
        return name


class EvalConfig(Section):
    """Evaluation settings: the solver budgets (forward iterations) to evaluate at."""

    budgets: list[Annotated[Int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """Forward budgets (solver iterations) the global model is evaluated at after each round."""

    @field_validator("budgets")
    @classmethod
    def _at_least_one(cls, budgets: list[Int]) -> list[Int]:
        if not budgets:
            raise problem("at least one budget is required", "a non-empty list of integers >= 1", got=[])
        return budgets


class RayConfig(Section):
    """Ray settings for the ``ray`` engine (``address=None`` starts a local cluster).

    ``actors_per_tier`` fixes every tier's actor pool size (default: the tier's share of the CPUs, at
    least one); ``call_timeout_s`` is the wall-clock limit of one client call (its actor is replaced);
    ``num_cpus`` sets the logical CPUs of a local cluster (default: enough for every pool).
    """

    address: str | None = None
    """A Ray cluster to join (``auto``, ``host:port``); null: start a local one."""
    actors_per_tier: Int | None = Field(None, ge=1)
    """Actors in every tier's pool (null: the tier's share of the CPUs, at least one)."""
    call_timeout_s: Float | None = Field(None, gt=0)
    """Wall-clock limit of one client call in seconds; its actor is replaced (null: none)."""
    num_cpus: Float | None = Field(None, gt=0)
    """Logical CPUs of a local cluster (null: the machine's cores, or what the pools need)."""
    cohort_size: Int | Literal["auto"] = "auto"
    """Clients of one tier trained together in one vectorized call: ``auto`` (each actor of the tier's pool
    gets one cohort per round, capped by memory), a number >= 1, or 1 for one client per call."""

    @field_validator("cohort_size", mode="before")
    @classmethod
    def _cohort_size(cls, size: int | str) -> int | str:
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise problem(
                "must be auto or an integer >= 1", "auto, 1 (one client per call), 2, 3, ...", got=size
            )
        return size

    @field_validator("address")
    @classmethod
    def _address_not_empty(cls, address: str | None) -> str | None:
        if address is not None and not address:
            raise problem("must not be empty", "null (local cluster) or an address such as auto")
        return address


class FaultConfig(Section):
    """Fault injection: the probability that a client call raises, hangs for ``hang_s`` seconds, or
    returns NaN weights (drawn per call from the run seed, round and partition)."""

    raise_p: Float = Field(0.0, ge=0, le=1)
    """Probability that a client call raises."""
    hang_p: Float = Field(0.0, ge=0, le=1)
    """Probability that a client call hangs for ``hang_s`` seconds."""
    nan_p: Float = Field(0.0, ge=0, le=1)
    """Probability that a client call returns NaN weights."""
    hang_s: Float = Field(30.0, gt=0)
    """Seconds a hanging call hangs."""

    @model_validator(mode="after")
    def _total(self) -> FaultConfig:
        total = self.raise_p + self.hang_p + self.nan_p
        if total > 1.0 + 1e-9:
            raise problem(
                "fault probabilities must sum to at most 1", "raise_p + hang_p + nan_p <= 1", got=total
            )
        return self


class AsyncConfig(Section):
    """Buffered asynchronous aggregation (FedBuff), used with ``aggregation=async``: ``concurrency`` clients
    train at once; every ``buffer_size`` replies the server applies ``θ ← θ + server_lr · Σ p_i s(τ_i) Δ_i``
    with ``s`` the ``staleness`` function of the staleness ``τ_i`` (versions since the client's model)."""

    buffer_size: Int = Field(10, ge=1)
    """Replies per server update (FedBuff's ``K``), at most ``concurrency``."""
    concurrency: Int | None = Field(None, ge=1)
    """Clients training at once, in buffer_size..num_clients (null: min(2·buffer_size, num_clients))."""
    staleness: Literal["constant", "polynomial"] = "polynomial"
    """Staleness weight ``s(τ)``: ``constant`` (1) | ``polynomial`` (``(1+τ)^-staleness_exponent``)."""
    staleness_exponent: Float = Field(0.5, ge=0)
    """Exponent ``a`` of the polynomial weight (0.5: FedBuff's ``1/sqrt(1+τ)``)."""
    server_lr: Float = Field(1.0, gt=0)
    """Server learning rate ``η_g`` applied to the weighted buffer."""
    max_staleness: Int | None = Field(None, ge=0)
    """Replies staler than this are dropped, not aggregated (null: none)."""


class FedeqConfig(Section):
    """Root of the ``fedeq simulate`` configuration."""

    seed: Int = Field(0, ge=0)
    """Seed of every random draw: data split, partition, tiers, sampling, training, faults."""
    rounds: Int = Field(20, ge=1)
    """Federated rounds."""
    num_clients: Int = Field(20, ge=1)
    """Simulated devices, one data partition each."""
    clients_per_round: Int = 10
    """In 1..num_clients."""
    engine: registered_name(ENGINES) = "ray"  # type: ignore[valid-type]
    """What runs the simulation: ``ray`` (fedeq's device engine) | ``flower`` (Flower's simulation)."""
    aggregation: Literal["sync", "async"] = "sync"
    """``sync``: rounds of ``clients_per_round`` clients | ``async``: buffered asynchronous updates (FedBuff,
    the ``async`` section); ``rounds`` then counts server updates."""
    output_dir: str = "outputs"
    """Folder that holds the run folders."""
    run_name: str | None = None
    """Name of the run folder in ``output_dir`` (null: a new timestamped name)."""
    plugins: list[str] = Field(default_factory=list)
    """Modules (``my_pkg.cells``) or ``.py`` files imported before validation, so what they register
    can be named in this config; relative file paths are stored absolute."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    # ``async`` is a Python keyword: the section is declared through the class namespace (read it with
    # ``getattr(cfg, "async")``), so that its keys are ``async.buffer_size``, ... as everywhere else.
    __annotations__["async"] = "AsyncConfig"
    vars()["async"] = Field(default_factory=AsyncConfig)

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, output_dir: str) -> str:
        if not output_dir:
            raise problem("must not be empty", "a directory path")
        return output_dir

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or name in (".", "..") or re.search(r"[/\\]", name)):
            raise problem("not a valid directory name", "null or a name without path separators")
        return name

    @model_validator(mode="after")
    def _client_counts(self) -> FedeqConfig:
        n = self.num_clients
        check_range(self.clients_per_round, 1, max(n, 1), integer=True, at=("clients_per_round",))
        if self.strategy.min_available_nodes is not None:
            at = ("strategy", "min_available_nodes")
            check_range(self.strategy.min_available_nodes, 1, n, integer=True, at=at)
        check_client_ids(self.devices.tiers, n, at=("devices", "tiers"))
        self._check_personalization()
        if self.aggregation == "async":
            section: AsyncConfig = getattr(self, "async")
            check_range(section.buffer_size, 1, n, integer=True, at=("async", "buffer_size"))
            if section.concurrency is not None:
                at = ("async", "concurrency")
                check_range(section.concurrency, section.buffer_size, n, integer=True, at=at)
            if self.strategy.fraction_evaluate > 0:
                raise problem(
                    "federated evaluation is not run with aggregation=async",
                    "0 (the server's central evaluation runs after every update)",
                    got=self.strategy.fraction_evaluate,
                    at=("strategy", "fraction_evaluate"),
                )
        return self

    def _check_personalization(self) -> None:
        method = self.personalization.method
        if method == "none":
            return
        if self.data.client_test_fraction <= 0:
            raise problem(
                f"personalization.method={method} evaluates every client on its own test split, which is off",
                "a fraction in (0, 1), e.g. 0.2",
                got=self.data.client_test_fraction,
                at=("data", "client_test_fraction"),
            )
        if self.aggregation == "async":
            raise problem(
                "personalised methods run with synchronous rounds", "sync", got="async", at=("aggregation",)
            )
