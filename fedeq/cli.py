"""The ``fedeq`` command line.

``fedeq simulate [CONFIG.yaml] [key=value ...]`` runs a simulation (the embedded default without CONFIG).
A bad config or argument exits with status 2 and one line naming the key, before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedeq.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"fedeq: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedeq", description="Federated learning of Deep Equilibrium models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run a federated simulation")
    sim.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config followed by dotted overrides such as rounds=5",
    )
    sim.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    return parser


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest must be key=value overrides."""
    path: str | None = None
    overrides: list[str] = []
    for i, arg in enumerate(args):
        if "=" in arg:
            overrides.append(arg)
        elif i == 0:
            path = arg
        else:
            raise ConfigError(
                "overrides", "expected key=value", "key=value after an optional CONFIG.yaml", arg
            )
    return path, overrides


def check_runnable(cfg: object) -> None:
    """Checks that need the registries (strategy name and kwargs), still before any work."""
    from pathlib import Path

    from fedeq.server_app import strategy_for

    data = cfg.data  # type: ignore[attr-defined]
    for key in ("path", "test_path"):
        value = getattr(data, key)
        if data.name == "npz" and value is not None and not Path(value).is_file():
            raise ConfigError(
                f"data.{key}", "file not found", "an existing .npz file with arrays x and y", value
            )
    strategy_for(cfg)


def cmd_simulate(ns: argparse.Namespace) -> int:
    try:
        path, overrides = split_config_args(ns.args)
        cfg = load_config(path, overrides)
        check_runnable(cfg)
    except (ConfigError, ValueError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    from fedeq.simulate import simulate

    out = simulate(cfg, quiet=ns.quiet)
    print(f"results written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "simulate":
        return cmd_simulate(ns)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
