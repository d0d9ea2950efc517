"""Building a config: YAML files and text, ``key=value`` overrides, and the Flower run-config round trip.

A run configuration is built in three layers, each merged over the previous one:

1. the schema's defaults (:func:`default_config`),
2. an optional YAML file (see ``simulations/configs/``),
3. ``key=value`` overrides with dotted keys (``train.lr=0.001``, ``devices.tiers.0.f_max_iter=5``
   or ``devices.tiers[0].f_max_iter=5``); values are parsed as YAML (``[1, 2]``, ``null``, ``1e-3``).

Layers are merged and interpolations (``${rounds}``) resolved with OmegaConf; the result is then
validated (:func:`fedeq.config.validate.build`), after importing the configured ``plugins``. Every
problem -- unknown key, wrong type, out-of-range value, unreadable file -- is a :class:`ConfigError`
naming the full dotted key and what is allowed there.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel

from fedeq.config.errors import ConfigError
from fedeq.config.schema import FedeqConfig
from fedeq.config.translate import describe, dotted, slot_at
from fedeq.config.validate import build

__all__ = [
    "RUN_CONFIG_KEY",
    "RUN_OVERRIDES_KEY",
    "apply_overrides",
    "attribute_view",
    "config_from_run_config",
    "config_from_yaml",
    "default_config",
    "load_config",
    "to_run_config",
    "to_yaml",
]

#: Key of the run-config entry that carries the resolved config as YAML text.
RUN_CONFIG_KEY = "fedeq-config"
#: Key of the run-config entry that carries whitespace-separated ``key=value`` overrides.
RUN_OVERRIDES_KEY = "overrides"

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
# Merging and overrides (on an untyped OmegaConf tree; the schema is checked at the end)
# ---------------------------------------------------------------------------------------------


def _translate(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "config"
    text = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    problem = " ".join(text.strip().splitlines()[0].split())
    return ConfigError(key, problem, "see the FedeqConfig schema", getattr(exc, "value", None))


def _tree(cfg: FedeqConfig | Mapping[str, Any]) -> DictConfig:
    data = cfg.model_dump(warnings=False) if isinstance(cfg, BaseModel) else cfg
    return OmegaConf.create(data)  # type: ignore[arg-type]


def _check_shapes(node: Any, value: Any, loc: tuple[str | int, ...]) -> None:
    """A mapping may not replace a list (or the reverse): report it at its key before merging."""
    if isinstance(node, DictConfig) and isinstance(value, Mapping):
        for key, sub in value.items():
            if isinstance(key, str) and key in node:
                _check_shapes(node._get_node(key), sub, (*loc, key))
        return
    mismatch = (isinstance(node, DictConfig) and isinstance(value, list | tuple)) or (
        isinstance(node, ListConfig) and isinstance(value, Mapping)
    )
    if mismatch:
        slot = slot_at(FedeqConfig, loc)
        problem = "expected a mapping" if isinstance(node, DictConfig) else "expected a list"
        raise ConfigError(dotted(loc), problem, describe(slot) if slot else "any value", value)


def _merge(tree: DictConfig, data: Mapping[str, Any]) -> DictConfig:
    _check_shapes(tree, data, ())
    try:
        return OmegaConf.merge(tree, data)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None


def _split_key(key: str) -> list[str]:
    """Split ``a.b[0].c`` / ``a.b.0.c`` into segments; raise ``ValueError`` when malformed."""
    normalized = re.sub(r"\[([^\[\]]*)\]", r".\1", key.strip())
    parts = normalized.split(".")
    if not key.strip() or any(not p.strip() for p in parts) or "[" in normalized or "]" in normalized:
        raise ValueError(key)
    return [p.strip() for p in parts]


def _child(node: Any, key: str | int) -> Any:
    """Child container of ``node`` (``None`` for leaves and null or absent values)."""
    if not isinstance(node, DictConfig | ListConfig):
        return None
    try:
        child = node._get_node(key)
    except (OmegaConfBaseException, KeyError, IndexError):
        return None
    return child if isinstance(child, DictConfig | ListConfig) and not child._is_none() else None


def _resolve_path(tree: DictConfig, key: str, source: str) -> tuple[tuple[str | int, ...], Any]:
    """Walk dotted ``key`` through schema and tree; return its location and its current node."""
    try:
        segments = _split_key(key)
    except ValueError:
        raise ConfigError(source, "malformed key", "a dotted config key such as train.lr", key) from None
    loc: tuple[str | int, ...] = ()
    node: Any = tree
    for seg in segments:
        slot = slot_at(FedeqConfig, loc)
        assert slot is not None  # every prefix was checked in an earlier step
        origin = typing.get_origin(slot.inner)
        if slot.inner is Any:
            loc, node = (*loc, seg), None
            continue
        if slot.model is None and origin not in (list, dict):
            raise ConfigError(dotted(loc), "this key has no sub-keys", describe(slot), dotted((*loc, seg)))
        if node is None:
            raise ConfigError(dotted(loc), "cannot set a sub-key of a null value", describe(slot), None)
        if slot.model is not None and seg not in slot.model.model_fields:
            raise ConfigError(dotted((*loc, seg)), "unknown key", ", ".join(slot.model.model_fields), seg)
        if origin is list:
            size = len(node)
            allowed = f"an index in 0..{size - 1}" if size else "no index (the list is empty)"
            if not seg.isdigit() or int(seg) >= size:
                bad = dotted((*loc, int(seg) if seg.isdigit() else seg))
                raise ConfigError(bad, "list index out of range", allowed, seg)
            loc, node = (*loc, int(seg)), _child(node, int(seg))
        else:
            loc, node = (*loc, seg), _child(node, seg)
    return loc, node


def _set(tree: DictConfig, key: str, value: Any, source: str) -> None:
    loc, node = _resolve_path(tree, key, source)
    _check_shapes(node, value, loc)
    try:
        OmegaConf.update(tree, dotted(loc), value, merge=True)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError("overrides", "malformed override", "key=value with a dotted config key", item)
    key, text = item.split("=", 1)
    key = key.strip()
    return key, _parse_yaml(text, key, text)


def _apply(tree: DictConfig, overrides: Sequence[str], source: str) -> None:
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, value = _parse_override(item)
        _set(tree, key, value, source)


def _finalize(tree: DictConfig) -> FedeqConfig:
    try:
        data = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    return build(typing.cast(dict[str, Any], data))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def default_config() -> FedeqConfig:
    """The embedded default run."""
    return FedeqConfig()


def apply_overrides(cfg: FedeqConfig, overrides: Sequence[str]) -> FedeqConfig:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied, validated."""
    tree = _tree(cfg)
    _apply(tree, overrides, "overrides")
    return _finalize(tree)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FedeqConfig:
    """Merge the default, YAML file ``path`` (if given) and ``overrides``; import plugins; validate.

    Raises :class:`ConfigError` for an unreadable file (key ``config``), a malformed override
    (key ``overrides``), a plugin that cannot be imported (``plugins[i]``), unknown keys, wrong
    types and out-of-range values.
    """
    tree = _tree(default_config())
    if path is not None:
        tree = _merge(tree, _read_file(path))
    _apply(tree, overrides, "overrides")
    return _finalize(tree)


def to_yaml(cfg: FedeqConfig) -> str:
    """Render the resolved config as YAML text."""
    return OmegaConf.to_yaml(_tree(cfg))


def config_from_yaml(text: str) -> FedeqConfig:
    """Parse YAML text (as produced by :func:`to_yaml`) over the default and validate it."""
    return _finalize(_merge(_tree(default_config()), _parse_document(text, "<yaml text>")))


def to_run_config(cfg: FedeqConfig) -> dict[str, str]:
    """Flower run config carrying the whole resolved config: ``{"fedeq-config": <yaml>}``."""
    return {RUN_CONFIG_KEY: to_yaml(cfg)}


def attribute_view(cfg: Any) -> Any:
    """A plain Python copy of a config (or any part of it) with attribute access (``SimpleNamespace``).

    Useful where the copy is read often or must not share state with the config.
    """

    def view(value: Any) -> Any:
        if isinstance(value, Mapping):
            return types.SimpleNamespace(**{k: view(v) for k, v in value.items()})
        if isinstance(value, list | tuple):
            return [view(v) for v in value]
        return value

    if isinstance(cfg, BaseModel):
        return view(cfg.model_dump())
    if isinstance(cfg, list | tuple):
        return [attribute_view(item) for item in cfg]
    if isinstance(cfg, DictConfig | ListConfig):
        return view(OmegaConf.to_container(cfg, resolve=True))
    return view(cfg)


def config_from_run_config(run_config: Mapping[str, Any]) -> FedeqConfig:
    """Rebuild the config from a Flower run config (plugins imported in this process).

    ``fedeq-config`` holds YAML text or the path of a YAML file (empty or absent: the embedded default);
    ``overrides`` holds whitespace-separated ``key=value`` items (``flwr run . -c 'overrides="rounds=3"'``).
    Every other key must be a dotted config key (``rounds``, ``train.lr``) and is applied as an override.
    String values are parsed as YAML, so ``eval.budgets="[1, 2, 4]"`` works.
    """
    text = run_config.get(RUN_CONFIG_KEY, "")
    if not isinstance(text, str):
        raise ConfigError(RUN_CONFIG_KEY, "expected YAML text or a file path", "a string", text)
    tree = _tree(default_config())
    if text.strip():
        looks_like_path = "\n" not in text and text.strip().endswith((".yaml", ".yml"))
        data = _read_file(text.strip()) if looks_like_path else _parse_document(text, RUN_CONFIG_KEY)
        tree = _merge(tree, data)
    overrides = run_config.get(RUN_OVERRIDES_KEY, "")
    if not isinstance(overrides, str):
        raise ConfigError(RUN_OVERRIDES_KEY, "expected key=value items", "a string", overrides)
    _apply(tree, overrides.split(), "run_config")
    for key, raw in run_config.items():
        if key in (RUN_CONFIG_KEY, RUN_OVERRIDES_KEY):
            continue
        value = _parse_yaml(raw, key, raw) if isinstance(raw, str) else raw
        _set(tree, str(key), value, "run_config")
    return _finalize(tree)
