"""``fedeq config show [CONFIG.yaml] [key=value ...]``: the resolved config as YAML, every key described.

The values are those a run would use (the embedded default, the file, then the overrides, validated), in
the order of the run's ``config.yaml``; each key carries a comment with its one-line description from the
schema (the field docstrings of :mod:`fedeq.config.schema`, :mod:`fedeq.config.data` and
:mod:`fedeq.config.tiers`). The output is itself a valid config file.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from pydantic import BaseModel

from fedeq.cli.config_args import split_config_args
from fedeq.config import ConfigError, load_config, to_yaml

__all__ = ["add_config_parser", "annotated_yaml", "cmd_config", "describe"]

COMMENT_COLUMN = 40
"""Comments start at this column (or two spaces after a longer line)."""


def add_config_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``config`` (with its action ``show``) to the ``fedeq`` subparsers ``sub``."""
    cfg = sub.add_parser("config", help="show the resolved configuration")
    actions = cfg.add_subparsers(dest="config_command", required=True, parser_class=type(cfg))
    show = actions.add_parser("show", help="print the resolved config as YAML, each key with its description")
    show.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config followed by dotted overrides such as rounds=5",
    )
    return cfg


def cmd_config(ns: argparse.Namespace) -> int:
    """Print the annotated config ``ns`` describes; 2 on a bad config or override."""
    try:
        path, overrides = split_config_args(ns.args)
        cfg = load_config(path, overrides)
    except (ConfigError, ValueError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(annotated_yaml(cfg))
    return 0


def describe(field: Any, section: type[BaseModel] | None = None) -> str:
    """One line about a schema field: its description (docstring), else its section's summary line."""
    text = field.description or (section.__doc__ or "" if section is not None else "")
    text = text.strip().split("\n\n")[0]
    return " ".join(text.replace("``", "").split())


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The config section (a pydantic model) a field holds, directly or as the items of a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for candidate in typing.get_args(annotation):  # X | None, list[X]
        found = _section_of(candidate)
        if found is not None:
            return found
    return None


def _scalar(value: Any) -> str:
    """``value`` as one line of YAML (flow style for lists and mappings)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=2**16, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _line(out: list[str], text: str, comment: str) -> None:
    if comment:
        text = f"{text.ljust(COMMENT_COLUMN - 2)}  # {comment}"
    out.append(text)


def _emit(
    out: list[str], values: dict[str, Any], model: type[BaseModel], indent: str, first: str, notes: bool
) -> None:
    """Append ``values`` (one section), with the descriptions of ``model``'s fields when ``notes``.
    ``first`` replaces the indent of the first key (``"- "`` for an item of a list)."""
    for i, (key, value) in enumerate(values.items()):
        lead = first if i == 0 else indent
        field = model.model_fields.get(key)
        section = _section_of(field.annotation) if field is not None else None
        comment = describe(field, section) if field is not None and notes else ""
        if section is not None and isinstance(value, dict) and value:
            _line(out, f"{lead}{key}:", comment)
            _emit(out, value, section, indent + "  ", indent + "  ", notes)
        elif section is not None and isinstance(value, list) and value and isinstance(value[0], dict):
            _line(out, f"{lead}{key}:", comment)
            for n, item in enumerate(value):  # a list of sections: the first item's keys are described
                _emit(out, item, section, indent + "  ", indent + "- ", notes and n == 0)
        else:
            _line(out, f"{lead}{key}: {_scalar(value)}", comment)


def annotated_yaml(cfg: Any) -> str:
    """The resolved config ``cfg`` as YAML (the values of :func:`fedeq.config.to_yaml`), every key with a
    comment describing it."""
    import yaml

    values = yaml.safe_load(to_yaml(cfg))
    out: list[str] = []
    _emit(out, values, type(cfg), "", "", True)
    return "\n".join(out) + "\n"
