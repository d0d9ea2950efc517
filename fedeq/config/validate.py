"""Validation: import the configured plugins, then check the data against the schema."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from fedeq.config.errors import ConfigError
from fedeq.config.schema import FedeqConfig
from fedeq.config.translate import config_error
from fedeq.registry import PluginError, import_plugins, plugin_spec

__all__ = ["build", "load_plugins", "validate"]


def load_plugins(specs: Any) -> Any:
    """Import each plugin (a module name or a ``.py`` file) and return ``specs`` with file paths absolute.

    Entries that are not strings are returned as they are (the schema reports them); an entry that
    cannot be imported is a :class:`ConfigError` on ``plugins[i]``.
    """
    if not isinstance(specs, list | tuple):
        return specs
    resolved: list[Any] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            absolute = plugin_spec(spec)
            try:
                import_plugins([absolute])
            except PluginError as exc:
                raise ConfigError(
                    f"plugins[{i}]",
                    f"cannot import plugin ({exc.problem})",
                    "an importable module name or an existing .py file",
                    spec,
                ) from None
            spec = absolute
        resolved.append(spec)
    return resolved


def build(data: Mapping[str, Any]) -> FedeqConfig:
    """A validated :class:`FedeqConfig` from plain data (its ``plugins`` imported first)."""
    data = dict(data)
    if "plugins" in data:
        data["plugins"] = load_plugins(data["plugins"])
    try:
        return FedeqConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, FedeqConfig) from None


def validate(cfg: FedeqConfig | Mapping[str, Any]) -> FedeqConfig:
    """Check every value range and cross-field rule of ``cfg`` (also after assignments to its fields).

    Raises :class:`ConfigError` on the first problem; returns the validated copy.
    """
    data = cfg.model_dump(warnings=False) if isinstance(cfg, BaseModel) else cfg
    return build(data)
