"""The ``fedeq`` command line.

``fedeq simulate [CONFIG.yaml] [key=value ...]`` runs a simulation (the embedded default without CONFIG);
``fedeq deploy ...`` runs on a real Flower SuperLink and SuperNodes. A bad config or argument exits with
status 2 and one line naming the key, before any work.

This module builds the parser from the subcommands' modules (:mod:`fedeq.cli.simulate`,
:mod:`fedeq.cli.deploy`) and dispatches to them; they never import it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedeq.cli.config_args import check_runnable, split_config_args
from fedeq.cli.deploy import add_deploy_parser, cmd_deploy
from fedeq.cli.simulate import add_simulate_parser, cmd_simulate

__all__ = ["build_parser", "check_runnable", "main", "split_config_args"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"simulate": cmd_simulate, "deploy": cmd_deploy}
"""Subcommand name -> the function that runs it (returns the exit status)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"fedeq: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedeq", description="Federated learning of Deep Equilibrium models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_simulate_parser(sub)
    add_deploy_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options: `fedeq simulate cfg.yaml --quiet rounds=5`
        flags = [e for e in extra if e.startswith("-")]
        if ns.command != "simulate" or flags:
            parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
        ns.args = [*ns.args, *extra]
    command = COMMANDS.get(ns.command)
    return command(ns) if command is not None else 2


if __name__ == "__main__":
    raise SystemExit(main())
