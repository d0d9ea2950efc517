"""Structured configuration for ``fedeq simulate``.

The schema is a tree of dataclasses (:class:`FedeqConfig` at the root) whose defaults are the
embedded default run: the ``digits`` data set split over 20 clients with a Dirichlet(0.5)
partition, four device tiers with solver budgets from 2 to 30 iterations, and 20 rounds.

A run configuration is built in three layers, each merged over the previous one:

1. the structured default (:func:`default_config`),
2. an optional YAML file (see ``simulations/configs/``),
3. ``key=value`` overrides with dotted keys (``train.lr=0.001``, ``devices.tiers.0.f_max_iter=5``
   or ``devices.tiers[0].f_max_iter=5``); values are parsed as YAML (``[1, 2]``, ``null``, ``1e-3``).

Every problem -- unknown key, wrong type, out-of-range value, unreadable file -- is reported as a
:class:`ConfigError` that names the full dotted key and what is allowed there.

The returned objects are OmegaConf ``DictConfig`` instances backed by the schema (attribute access,
type-checked assignment, unknown keys rejected); they are annotated as :class:`FedeqConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import (
    MISSING,
    BooleanNode,
    DictConfig,
    FloatNode,
    IntegerNode,
    ListConfig,
    OmegaConf,
    StringNode,
)
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ADVERSARIAL_MODES",
    "ATTACK_NORMS",
    "BACKWARDS",
    "DATA_NAMES",
    "DEVICES",
    "ENGINES",
    "MODEL_NAMES",
    "OPTIMIZERS",
    "PARTITIONS",
    "RUN_CONFIG_KEY",
    "SHARE_TOLERANCE",
    "SOLVERS",
    "STOP_MODES",
    "ConfigError",
    "DataConfig",
    "DevicesConfig",
    "EvalConfig",
    "FedeqConfig",
    "ModelConfig",
    "RayConfig",
    "StrategyConfig",
    "TierConfig",
    "TrainConfig",
    "apply_overrides",
    "assign_tiers",
    "config_from_run_config",
    "config_from_yaml",
    "default_config",
    "load_config",
    "to_run_config",
    "to_yaml",
    "validate",
]

# ---------------------------------------------------------------------------------------------
# Allowed values (single source of truth; extend these tuples to add new choices)
# ---------------------------------------------------------------------------------------------

ENGINES: tuple[str, ...] = ("ray", "flower")
DATA_NAMES: tuple[str, ...] = ("digits", "mnist5k", "npz")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")
MODEL_NAMES: tuple[str, ...] = (
    "mlp_deq",
    "conv_deq",
    "explicit",
    "mondeq",
    "conv_mondeq",
    "tied",
    "tied_sparse",
    "lyadeq",
)
MASK_PATTERNS: tuple[str, ...] = ("unstructured", "row")
STOP_MODES: tuple[str, ...] = ("abs", "rel")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
SOLVERS: tuple[str, ...] = ("fixed_point", "anderson", "broyden")
BACKWARDS: tuple[str, ...] = ("ift", "phantom", "jfb", "broyden_reuse")
ADVERSARIAL_MODES: tuple[str, ...] = ("none", "pgd", "trades")
ATTACK_NORMS: tuple[str, ...] = ("linf", "l2")

#: Key of the run-config entry that carries the resolved config as YAML text.
RUN_CONFIG_KEY = "fedeq-config"
RUN_OVERRIDES_KEY = "overrides"
DEADLINE_POLICIES = ("drop", "partial")
#: Allowed deviation of the sum of tier shares from 1.
SHARE_TOLERANCE = 1e-6

_STRATEGY_NAME_RE = re.compile(r"^[A-Za-z_]\w*$|^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$", re.ASCII)

# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Data set and its partition over clients."""

    name: str = "digits"
    path: str | None = None
    test_path: str | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    partition: str = "dirichlet"
    alpha: float = 0.5
    labels_per_client: int = 2


@dataclass
class ModelConfig:
    """Model family and its size / solver tolerance."""

    name: str = "mlp_deq"
    hidden: int = 64
    channels: int = 16
    depth: int = 3
    tol: float = 1e-4
    stop_mode: str = "rel"
    monotone_m: float = 0.1
    """mondeq: strong-monotonicity margin m of W = (1 - m) I - AᵀA + B - Bᵀ."""
    mask_density: float = 0.5
    """tied_sparse: fraction of kept weights in each layer's mask."""
    mask_pattern: str = "unstructured"
    """tied_sparse: unstructured (entries) | row (output units)."""
    mask_seed: int = 0
    """tied_sparse: seed of the per-layer masks."""


@dataclass
class TrainConfig:
    """Local training hyper-parameters."""

    local_epochs: int = 3
    lr: float = 0.01
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float = 0.0
    device: str = "auto"
    jac_reg: float = 0.0
    jac_reg_samples: int = 1
    randomize_budget: bool = False
    proximal_mu: float = 0.0
    adversarial: str = "none"
    """Local adversarial training: ``none`` | ``pgd`` (PGD-AT) | ``trades``."""
    epsilon: float = 0.1
    attack_steps: int = 5
    attack_step_size: float | None = None
    """PGD step; ``null`` = 2.5·epsilon/attack_steps."""
    attack_norm: str = "linf"
    trades_beta: float = 6.0
    intermediate_states: bool = False
    """Compute the (adversarial) loss at a random intermediate solver state."""


@dataclass
class StrategyConfig:
    """Server strategy: a built-in name or ``package.module:ClassName`` plus constructor kwargs."""

    name: str = "quality"
    kwargs: dict[str, Any] = field(default_factory=dict)
    fraction_evaluate: float = 0.0
    min_available_nodes: int | None = None
    """Connected nodes a round waits for before sampling (null: ``num_clients``); lower it on a real
    deployment so rounds go on after a device dropped out."""
    round_timeout_s: float | None = None
    """Seconds the server waits for a round's replies (null: Flower's default of 3600)."""


@dataclass
class EvalConfig:
    """Evaluation settings: the solver budgets (forward iterations) to evaluate at."""

    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])


@dataclass
class TierConfig:
    """One device tier: solver budget, backward mode and simulated hardware.

    ``share`` is the fraction of clients in the tier; it is ignored (and may stay 0) when ``ids``
    lists the tier's client ids explicitly.
    """

    name: str = MISSING
    share: float = 0.0
    ids: list[int] | None = None
    solver: str = "anderson"
    f_max_iter: int = MISSING  # type: ignore[assignment]
    b_max_iter: int = MISSING  # type: ignore[assignment]
    backward: str = "ift"
    speed: float = 1.0
    bandwidth_up_mbps: float = 10.0
    bandwidth_down_mbps: float = 50.0
    latency_s: float = 0.05
    availability: float = 1.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: float | None = None


def _default_tiers() -> list[TierConfig]:
    return [
        TierConfig(
            name="micro",
            share=0.25,
            solver="fixed_point",
            f_max_iter=2,
            b_max_iter=2,
            backward="jfb",
            speed=0.25,
            bandwidth_up_mbps=1.0,
            bandwidth_down_mbps=5.0,
            latency_s=0.2,
            availability=0.8,
        ),
        TierConfig(
            name="phone",
            share=0.25,
            solver="anderson",
            f_max_iter=6,
            b_max_iter=4,
            backward="phantom",
            speed=0.5,
            bandwidth_up_mbps=5.0,
            bandwidth_down_mbps=20.0,
            latency_s=0.1,
            availability=0.9,
        ),
        TierConfig(
            name="laptop",
            share=0.25,
            solver="anderson",
            f_max_iter=12,
            b_max_iter=8,
            backward="ift",
            speed=1.0,
            bandwidth_up_mbps=20.0,
            bandwidth_down_mbps=100.0,
            latency_s=0.05,
            availability=0.95,
        ),
        TierConfig(
            name="workstation",
            share=0.25,
            solver="broyden",
            f_max_iter=30,
            b_max_iter=20,
            backward="ift",
            speed=4.0,
            bandwidth_up_mbps=100.0,
            bandwidth_down_mbps=500.0,
            latency_s=0.02,
            availability=1.0,
        ),
    ]


@dataclass
class DevicesConfig:
    """Device tiers and the optional simulated round deadline (seconds)."""

    tiers: list[TierConfig] = field(default_factory=_default_tiers)
    deadline_s: float | None = None
    deadline_policy: str = "drop"
    """``drop``: replies past the deadline are discarded; ``partial``: clients stop training when their
    simulated time reaches the deadline and their partial work is aggregated."""
    nfe_cost_s: float = 1e-4
    """Simulated seconds one function evaluation costs per sample on a tier of speed 1.0."""


@dataclass
class RayConfig:
    """Ray settings for the ``ray`` engine (``address=None`` starts a local cluster).

    ``actors_per_tier`` fixes every tier's actor pool size (default: the tier's share of the CPUs, at
    least one); ``call_timeout_s`` is the wall-clock limit of one client call (its actor is replaced);
    ``num_cpus`` sets the logical CPUs of a local cluster (default: enough for every pool).
    """

    address: str | None = None
    actors_per_tier: int | None = None
    call_timeout_s: float | None = None
    num_cpus: float | None = None


@dataclass
class FaultConfig:
    """Fault injection: the probability that a client call raises, hangs for ``hang_s`` seconds, or
    returns NaN weights (drawn per call from the run seed, round and partition)."""

    raise_p: float = 0.0
    hang_p: float = 0.0
    nan_p: float = 0.0
    hang_s: float = 30.0


@dataclass
class FedeqConfig:
    """Root of the ``fedeq simulate`` configuration."""

    seed: int = 0
    rounds: int = 20
    num_clients: int = 20
    clients_per_round: int = 10
    engine: str = "ray"
    output_dir: str = "outputs"
    run_name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """Short one-line rendering of an offending value."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


class ConfigError(ValueError):
    """Invalid configuration.

    ``key`` is the full dotted key (e.g. ``devices.tiers[1].f_max_iter``, or ``config`` /
    ``overrides`` for problems with the file or the override syntax). The message is one line:
    ``"<key>: <what is wrong>; allowed: <what is allowed> (got <value>)"``.
    """

    def __init__(self, key: str, problem: str, allowed: str, got: Any) -> None:
        self.key = key
        self.problem = problem
        self.allowed = allowed
        self.got = got
        message = f"{key}: {problem}; allowed: {allowed} (got {_show(got)})"
        super().__init__(" ".join(message.splitlines()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.problem, self.allowed, self.got))


# ---------------------------------------------------------------------------------------------
# Schema introspection and raw-value checking
# ---------------------------------------------------------------------------------------------

_SCALAR_NODES: dict[type, type] = {int: IntegerNode, float: FloatNode, bool: BooleanNode, str: StringNode}
_SCALAR_WORDS: dict[type, str] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
}


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _unwrap_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return True, args[0] if len(args) == 1 else Any
    return False, tp


def _fields(dc: type) -> dict[str, Any]:
    hints = typing.get_type_hints(dc)
    return {f.name: hints[f.name] for f in dataclasses.fields(dc)}


def _describe(tp: Any) -> str:
    optional, inner = _unwrap_optional(tp)
    if dataclasses.is_dataclass(inner):
        text = "a mapping with keys " + ", ".join(_fields(cast(type, inner)))
    elif typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner)
        text = f"a list of {_describe(elem).removeprefix('a ').removeprefix('an ')}s"
        if dataclasses.is_dataclass(elem):
            text = "a list of mappings with keys " + ", ".join(_fields(elem))
    elif typing.get_origin(inner) is dict:
        text = "a mapping of string keys"
    elif inner in _SCALAR_WORDS:
        text = _SCALAR_WORDS[inner]
    else:
        text = "any value"
    return f"{text} or null" if optional else text


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_raw(value: Any, tp: Any, path: str) -> None:
    """Check a plain-Python value against schema type ``tp``; raise :class:`ConfigError` at ``path``."""
    optional, inner = _unwrap_optional(tp)
    if inner is Any:
        return
    if value is None:
        if not optional:
            raise ConfigError(path or "config", "null is not allowed here", _describe(tp), value)
        return
    if _is_interpolation(value) or (isinstance(value, str) and value == MISSING):
        return
    if dataclasses.is_dataclass(inner):
        fields = _fields(cast(type, inner))
        if not isinstance(value, Mapping):
            raise ConfigError(path or "config", "expected a mapping", _describe(tp), value)
        for key, sub in value.items():
            if key not in fields:
                raise ConfigError(_join(path, str(key)), "unknown key", ", ".join(fields), key)
            _check_raw(sub, fields[key], _join(path, key))
        return
    origin = typing.get_origin(inner)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, "expected a list", _describe(tp), value)
        (elem,) = typing.get_args(inner)
        for index, item in enumerate(value):
            _check_raw(item, elem, _join(path, index))
        return
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, "expected a mapping", _describe(tp), value)
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(_join(path, str(key)), "mapping keys must be strings", "string keys", key)
        return
    node_cls = _SCALAR_NODES.get(inner)
    if node_cls is None:  # pragma: no cover - schema only uses the types above
        return
    if isinstance(value, Mapping | list | tuple):
        raise ConfigError(path, f"expected {_SCALAR_WORDS[inner]}", _describe(tp), value)
    try:
        node_cls(value=value, is_optional=optional)
    except OmegaConfBaseException:
        raise ConfigError(path, f"expected {_SCALAR_WORDS[inner]}", _describe(tp), value) from None


def _split_key(key: str) -> list[str]:
    """Split ``a.b[0].c`` / ``a.b.0.c`` into segments; raise ``ValueError`` when malformed."""
    normalized = re.sub(r"\[([^\[\]]*)\]", r".\1", key.strip())
    parts = normalized.split(".")
    if not key.strip() or any(not p.strip() for p in parts) or "[" in normalized or "]" in normalized:
        raise ValueError(key)
    return [p.strip() for p in parts]


def _child(node: Any, key: str | int) -> Any:
    """Child container of ``node`` (``None`` for leaves, missing or absent values)."""
    if not isinstance(node, DictConfig | ListConfig):
        return None
    try:
        child = node._get_node(key)
    except (OmegaConfBaseException, KeyError, IndexError):
        return None
    return child if isinstance(child, DictConfig | ListConfig) and not child._is_none() else None


def _resolve_path(cfg: Any, key: str, source: str) -> tuple[Any, str]:
    """Walk dotted ``key`` through schema and config; return (leaf type, normalized full key)."""
    try:
        segments = _split_key(key)
    except ValueError:
        raise ConfigError(source, "malformed key", "a dotted config key such as train.lr", key) from None
    tp: Any = FedeqConfig
    node: Any = cfg
    path = ""
    for seg in segments:
        _, inner = _unwrap_optional(tp)
        origin = typing.get_origin(inner)
        if inner is Any:
            path, node = _join(path, seg), None
            continue
        if not (dataclasses.is_dataclass(inner) or origin in (list, dict)):
            raise ConfigError(path, "this key has no sub-keys", _describe(tp), _join(path, seg))
        if node is None:
            raise ConfigError(path, "cannot set a sub-key of a null value", _describe(tp), None)
        if dataclasses.is_dataclass(inner):
            fields = _fields(cast(type, inner))
            if seg not in fields:
                raise ConfigError(_join(path, seg), "unknown key", ", ".join(fields), seg)
            tp, path = fields[seg], _join(path, seg)
            node = _child(node, seg)
        elif origin is list:
            size = len(node)
            allowed = f"an index in 0..{size - 1}" if size else "no index (the list is empty)"
            if not seg.isdigit() or int(seg) >= size:
                bad = _join(path, int(seg)) if seg.isdigit() else _join(path, seg)
                raise ConfigError(bad, "list index out of range", allowed, seg)
            index = int(seg)
            (tp,) = typing.get_args(inner)
            path, node = _join(path, index), _child(node, index)
        else:
            (_, tp) = typing.get_args(inner)
            path, node = _join(path, seg), _child(node, seg)
    return tp, path


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML loader with YAML 1.2 style booleans and floats such as ``1e-3``."""


_REPLACED_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, key: str, got: Any) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(key, f"invalid YAML ({problem})", "valid YAML", got) from None


def _parse_document(text: str, source: str) -> dict[str, Any]:
    data = _parse_yaml(text, "config", source)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            "config", "the top level must be a mapping", "a YAML mapping of config keys", source
        )
    return dict(data)


def _read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(
            "config", f"cannot read config file ({reason})", "a readable YAML file", str(p)
        ) from None
    return _parse_document(text, str(p))


# ---------------------------------------------------------------------------------------------
# Building configs
# ---------------------------------------------------------------------------------------------


def _translate(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    key = _join(prefix, key) if prefix and key else (prefix or key or "config")
    text = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    problem = " ".join(text.strip().splitlines()[0].split())
    return ConfigError(key, problem, "see the FedeqConfig schema", getattr(exc, "value", None))


def default_config() -> FedeqConfig:
    """The embedded default run as a schema-backed ``DictConfig`` (not re-validated)."""
    return cast(FedeqConfig, OmegaConf.structured(FedeqConfig))


def _merge(cfg: Any, data: Mapping[str, Any]) -> Any:
    _check_raw(data, FedeqConfig, "")
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None


def _set(cfg: Any, key: str, value: Any, source: str) -> None:
    tp, full_key = _resolve_path(cfg, key, source)
    _check_raw(value, tp, full_key)
    try:
        OmegaConf.update(cfg, full_key, value, merge=True)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError("overrides", "malformed override", "key=value with a dotted config key", item)
    key, text = item.split("=", 1)
    key = key.strip()
    return key, _parse_yaml(text, key, text)


def _finalize(cfg: Any) -> FedeqConfig:
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    validate(cfg)
    return cast(FedeqConfig, cfg)


def apply_overrides(cfg: FedeqConfig, overrides: Sequence[str]) -> FedeqConfig:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied, validated."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = cast(DictConfig, cfg).copy() if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    for item in overrides:
        key, value = _parse_override(item)
        _set(out, key, value, "overrides")
    return _finalize(out)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FedeqConfig:
    """Merge structured default, YAML file ``path`` (if given) and ``overrides``; validate.

    Raises :class:`ConfigError` for an unreadable file (key ``config``), a malformed override
    (key ``overrides``), unknown keys, wrong types and out-of-range values.
    """
    cfg: Any = default_config()
    if path is not None:
        cfg = _merge(cfg, _read_file(path))
    return apply_overrides(cfg, overrides)


def to_yaml(cfg: FedeqConfig) -> str:
    """Render the resolved config as YAML text."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def config_from_yaml(text: str) -> FedeqConfig:
    """Parse YAML text (as produced by :func:`to_yaml`) over the default and validate it."""
    cfg = _merge(default_config(), _parse_document(text, "<yaml text>"))
    return _finalize(cfg)


def to_run_config(cfg: FedeqConfig) -> dict[str, str]:
    """Flower run config carrying the whole resolved config: ``{"fedeq-config": <yaml>}``."""
    return {RUN_CONFIG_KEY: to_yaml(cfg)}


def attribute_view(cfg: Any) -> Any:
    """A plain Python copy of a config (or any part of it) with attribute access.

    Reads are ~100x cheaper than OmegaConf's, which matters on paths run once per client call or reply.
    """

    def view(value: Any) -> Any:
        if isinstance(value, dict):
            return types.SimpleNamespace(**{k: view(v) for k, v in value.items()})
        if isinstance(value, list):
            return [view(v) for v in value]
        return value

    return view(OmegaConf.to_container(cfg, resolve=True))


def config_from_run_config(run_config: Mapping[str, Any]) -> FedeqConfig:
    """Rebuild the config from a Flower run config.

    ``fedeq-config`` holds YAML text or the path of a YAML file (empty or absent: the embedded default);
    ``overrides`` holds whitespace-separated ``key=value`` items (``flwr run . -c 'overrides="rounds=3"'``).
    Every other key must be a dotted config key (``rounds``, ``train.lr``) and is applied as an override.
    String values are parsed as YAML, so ``eval.budgets="[1, 2, 4]"`` works.
    """
    text = run_config.get(RUN_CONFIG_KEY, "")
    if not isinstance(text, str):
        raise ConfigError(RUN_CONFIG_KEY, "expected YAML text or a file path", "a string", text)
    cfg: Any = default_config()
    if text.strip():
        looks_like_path = "\n" not in text and text.strip().endswith((".yaml", ".yml"))
        data = _read_file(text.strip()) if looks_like_path else _parse_document(text, RUN_CONFIG_KEY)
        cfg = _merge(cfg, data)
    overrides = run_config.get(RUN_OVERRIDES_KEY, "")
    if not isinstance(overrides, str):
        raise ConfigError(RUN_OVERRIDES_KEY, "expected key=value items", "a string", overrides)
    for item in overrides.split():
        key, value = _parse_override(item)
        _set(cfg, key, value, "run_config")
    for key, raw in run_config.items():
        if key in (RUN_CONFIG_KEY, RUN_OVERRIDES_KEY):
            continue
        value = _parse_yaml(raw, key, raw) if isinstance(raw, str) else raw
        _set(cfg, str(key), value, "run_config")
    return _finalize(cfg)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _fail(key: str, problem: str, allowed: str, got: Any) -> typing.NoReturn:
    raise ConfigError(key, problem, allowed, got)


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(key, "unknown value", " | ".join(choices), value)


def _bounded(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Check ``low <(=) value <(=) high`` (``None`` = unbounded); NaN is always rejected."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    kind = "an integer" if integer else "a number"
    fmt = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
    if low is not None and high is not None:
        allowed = f"{kind} in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{kind} {'>' if low_open else '>='} {fmt(low)}"
    elif high is not None:
        allowed = f"{kind} {'<' if high_open else '<='} {fmt(high)}"
    else:
        allowed = kind
    _fail(key, "out of range", allowed, value)


def _check_missing(cfg: Any) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        try:
            tp, _ = _resolve_path(cfg, key, "config")
            allowed = _describe(tp)
        except ConfigError:
            allowed = "a value"
        _fail(key, "missing mandatory value", allowed, MISSING)


def _validate_tiers(cfg: Any) -> None:
    tiers = cfg.devices.tiers
    n = cfg.num_clients
    if len(tiers) == 0:
        _fail("devices.tiers", "at least one tier is required", "a non-empty list of tiers", [])
    seen_names: dict[str, int] = {}
    owner: dict[int, int] = {}
    share_tiers: list[int] = []
    for i, tier in enumerate(tiers):
        p = f"devices.tiers[{i}]"
        if not tier.name:
            _fail(f"{p}.name", "tier name must not be empty", "a non-empty unique string", tier.name)
        if tier.name in seen_names:
            _fail(
                f"{p}.name",
                f"duplicate tier name (also used by devices.tiers[{seen_names[tier.name]}])",
                "unique tier names",
                tier.name,
            )
        seen_names[tier.name] = i
        if tier.ids is None:
            _bounded(f"{p}.share", tier.share, 0.0, 1.0, low_open=True)
            share_tiers.append(i)
        else:
            _bounded(f"{p}.share", tier.share, 0.0, 1.0)
            for j, cid in enumerate(tier.ids):
                key = f"{p}.ids[{j}]"
                _bounded(key, cid, 0, n - 1, integer=True)
                if cid in owner:
                    _fail(
                        key,
                        f"client id already assigned to devices.tiers[{owner[cid]}]",
                        "each client id in at most one tier",
                        cid,
                    )
                owner[cid] = i
        _choice(f"{p}.solver", tier.solver, SOLVERS)
        _bounded(f"{p}.f_max_iter", tier.f_max_iter, 1, integer=True)
        _bounded(f"{p}.b_max_iter", tier.b_max_iter, 1, integer=True)
        _choice(f"{p}.backward", tier.backward, BACKWARDS)
        if tier.backward == "broyden_reuse" and tier.solver != "broyden":
            _fail(
                f"{p}.backward",
                f"broyden_reuse requires solver broyden (solver is {tier.solver})",
                "ift | phantom | jfb with this solver, or set solver=broyden",
                tier.backward,
            )
        _bounded(f"{p}.speed", tier.speed, 0.0, low_open=True)
        _bounded(f"{p}.bandwidth_up_mbps", tier.bandwidth_up_mbps, 0.0, low_open=True)
        _bounded(f"{p}.bandwidth_down_mbps", tier.bandwidth_down_mbps, 0.0, low_open=True)
        _bounded(f"{p}.latency_s", tier.latency_s, 0.0)
        _bounded(f"{p}.availability", tier.availability, 0.0, 1.0, low_open=True)
        _bounded(f"{p}.num_cpus", tier.num_cpus, 0.0, low_open=True)
        _bounded(f"{p}.num_gpus", tier.num_gpus, 0.0)
        if tier.memory_mb is not None:
            _bounded(f"{p}.memory_mb", tier.memory_mb, 0.0, low_open=True)
    if share_tiers:
        shares = [float(tiers[i].share) for i in share_tiers]
        total = math.fsum(shares)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            _fail(
                "devices.tiers",
                f"tier shares must sum to 1 (sum is {total:g})",
                f"shares of tiers without ids summing to 1 within {SHARE_TOLERANCE:g}",
                shares,
            )
    elif len(owner) < n:
        unassigned = [c for c in range(n) if c not in owner]
        _fail(
            "devices.tiers",
            "some clients belong to no tier",
            "explicit ids covering every client id, or a tier with a share",
            unassigned,
        )


def validate(cfg: FedeqConfig) -> None:
    """Check every value range and cross-field rule; raise :class:`ConfigError` on the first problem."""
    if not isinstance(cfg, DictConfig):
        cfg = cast(FedeqConfig, OmegaConf.structured(cfg))
    c: Any = cfg
    _check_missing(c)

    _bounded("seed", c.seed, 0, integer=True)
    _bounded("rounds", c.rounds, 1, integer=True)
    _bounded("num_clients", c.num_clients, 1, integer=True)
    _bounded("clients_per_round", c.clients_per_round, 1, max(c.num_clients, 1), integer=True)
    _choice("engine", c.engine, ENGINES)
    if not c.output_dir:
        _fail("output_dir", "must not be empty", "a directory path", c.output_dir)
    name = c.run_name
    if name is not None and (not name or name in (".", "..") or re.search(r"[/\\]", name)):
        _fail("run_name", "not a valid directory name", "null or a name without path separators", c.run_name)

    d = c.data
    _choice("data.name", d.name, DATA_NAMES)
    if d.name == "npz" and not d.path:
        _fail("data.path", "data.name=npz requires a path", "path to an .npz file", d.path)
    _bounded("data.test_fraction", d.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    _bounded("data.val_fraction", d.val_fraction, 0.0, 1.0, high_open=True)
    _choice("data.partition", d.partition, PARTITIONS)
    _bounded("data.alpha", d.alpha, 0.0, low_open=True)
    _bounded("data.labels_per_client", d.labels_per_client, 1, integer=True)

    m = c.model
    _choice("model.name", m.name, MODEL_NAMES)
    _bounded("model.hidden", m.hidden, 1, integer=True)
    _bounded("model.channels", m.channels, 1, integer=True)
    _bounded("model.depth", m.depth, 1, integer=True)
    _bounded("model.tol", m.tol, 0.0, low_open=True)
    _choice("model.stop_mode", m.stop_mode, STOP_MODES)
    _bounded("model.monotone_m", m.monotone_m, 0.0, 1.0, low_open=True)
    _bounded("model.mask_density", m.mask_density, 0.0, 1.0, low_open=True)
    _choice("model.mask_pattern", m.mask_pattern, MASK_PATTERNS)
    _bounded("model.mask_seed", m.mask_seed, 0, integer=True)

    t = c.train
    _bounded("train.local_epochs", t.local_epochs, 1, integer=True)
    _bounded("train.lr", t.lr, 0.0, low_open=True)
    _bounded("train.batch_size", t.batch_size, 1, integer=True)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _bounded("train.weight_decay", t.weight_decay, 0.0)
    _choice("train.device", t.device, DEVICES)
    _bounded("train.jac_reg", t.jac_reg, 0.0)
    _bounded("train.jac_reg_samples", t.jac_reg_samples, 1, integer=True)
    _bounded("train.proximal_mu", t.proximal_mu, 0.0)
    _choice("train.adversarial", t.adversarial, ADVERSARIAL_MODES)
    if t.adversarial == "none":
        _bounded("train.epsilon", t.epsilon, 0.0)
    else:
        _bounded("train.epsilon", t.epsilon, 0.0, low_open=True)
    _bounded("train.attack_steps", t.attack_steps, 1, integer=True)
    if t.attack_step_size is not None:
        _bounded("train.attack_step_size", t.attack_step_size, 0.0, low_open=True)
    _choice("train.attack_norm", t.attack_norm, ATTACK_NORMS)
    _bounded("train.trades_beta", t.trades_beta, 0.0)

    s = c.strategy
    if not _STRATEGY_NAME_RE.match(s.name):
        _fail(
            "strategy.name",
            "malformed strategy name",
            "a built-in name (identifier) or package.module:ClassName",
            s.name,
        )
    _bounded("strategy.fraction_evaluate", s.fraction_evaluate, 0.0, 1.0)
    if s.min_available_nodes is not None:
        _bounded("strategy.min_available_nodes", s.min_available_nodes, 1, c.num_clients, integer=True)
    if s.round_timeout_s is not None:
        _bounded("strategy.round_timeout_s", s.round_timeout_s, 0.0, low_open=True)

    budgets = c.eval.budgets
    if len(budgets) == 0:
        _fail("eval.budgets", "at least one budget is required", "a non-empty list of integers >= 1", [])
    for i, b in enumerate(budgets):
        _bounded(f"eval.budgets[{i}]", b, 1, integer=True)

    _validate_tiers(c)
    _bounded("devices.nfe_cost_s", c.devices.nfe_cost_s, 0.0, low_open=True)
    _choice("devices.deadline_policy", c.devices.deadline_policy, DEADLINE_POLICIES)
    if c.ray.actors_per_tier is not None:
        _bounded("ray.actors_per_tier", c.ray.actors_per_tier, 1, integer=True)
    if c.ray.call_timeout_s is not None:
        _bounded("ray.call_timeout_s", c.ray.call_timeout_s, 0.0, low_open=True)
    if c.ray.num_cpus is not None:
        _bounded("ray.num_cpus", c.ray.num_cpus, 0.0, low_open=True)
    for key in ("raise_p", "hang_p", "nan_p"):
        _bounded(f"faults.{key}", getattr(c.faults, key), 0.0, 1.0)
    total_p = c.faults.raise_p + c.faults.hang_p + c.faults.nan_p
    if total_p > 1.0 + 1e-9:
        _fail("faults", "fault probabilities must sum to at most 1", "raise_p + hang_p + nan_p <= 1", total_p)
    _bounded("faults.hang_s", c.faults.hang_s, 0.0, low_open=True)
    if c.devices.deadline_s is not None:
        _bounded("devices.deadline_s", c.devices.deadline_s, 0.0, low_open=True)

    if c.ray.address is not None and not c.ray.address:
        _fail("ray.address", "must not be empty", "null (local cluster) or an address such as auto", "")


# ---------------------------------------------------------------------------------------------
# Client -> tier assignment
# ---------------------------------------------------------------------------------------------


def _largest_remainder(shares: Sequence[float], total: int) -> list[int]:
    """Integer quotas summing to ``total``, proportional to ``shares`` (ties -> lower index)."""
    norm = math.fsum(shares)
    exact = [s * total / norm for s in shares]
    quotas = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - quotas[i]), i))
    left = total - sum(quotas)
    for i in order[: max(left, 0)]:
        quotas[i] += 1
    for i in reversed(order):  # only when float slack over-allocated
        if left >= 0:
            break
        if quotas[i] > 0:
            quotas[i] -= 1
            left += 1
    return quotas


def _interleave(quotas: Sequence[int]) -> list[int]:
    """Order tier slots so every tier is spread evenly: slot ``k`` of a tier with quota ``q``
    is due at ``(k + 1/2) / q``; slots are emitted by due time, ties to the lower tier index."""
    taken = [0] * len(quotas)
    out: list[int] = []
    for _ in range(sum(quotas)):
        j = min(
            (i for i, q in enumerate(quotas) if taken[i] < q),
            key=lambda i: (Fraction(2 * taken[i] + 1, 2 * quotas[i]), i),
        )
        taken[j] += 1
        out.append(j)
    return out


def assign_tiers(cfg: FedeqConfig) -> list[int]:
    """Tier index of every client id ``0..num_clients-1`` (deterministic).

    Clients listed in a tier's ``ids`` go to that tier. The remaining clients, in increasing id
    order, are split over the tiers without ``ids``: each tier gets ``share * M`` clients (``M`` =
    number of remaining clients) rounded by the largest-remainder method (ties to the lower tier
    index), and the tiers are interleaved so each one is spread evenly over the id range (four
    equal tiers give ``0, 1, 2, 3, 0, 1, 2, 3, ...``).
    """
    validate(cfg)
    c: Any = cfg
    n = int(c.num_clients)
    tiers = list(c.devices.tiers)
    result = [-1] * n
    for t, tier in enumerate(tiers):
        if tier.ids is not None:
            for cid in tier.ids:
                result[int(cid)] = t
    remaining = [cid for cid in range(n) if result[cid] < 0]
    share_tiers = [t for t, tier in enumerate(tiers) if tier.ids is None]
    if remaining:
        quotas = _largest_remainder([float(tiers[t].share) for t in share_tiers], len(remaining))
        for cid, slot in zip(remaining, _interleave(quotas), strict=True):
            result[cid] = share_tiers[slot]
    return result
