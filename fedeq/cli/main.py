"""The ``fedeq`` command line.

``fedeq simulate [CONFIG.yaml] [key=value ...]`` runs a simulation (the embedded default without CONFIG);
``fedeq deploy ...`` runs on a real Flower SuperLink and SuperNodes; ``fedeq config show [CONFIG.yaml]
[key=value ...]`` prints the resolved config with a description of every key; ``fedeq sweep [CONFIG.yaml]
[key=value ...] --grid KEY=V1,V2 --seeds N`` runs a grid of configs over seeds and summarizes them. A bad
config or argument exits with status 2 and one line naming the key, before any work.

This module builds the parser from the subcommands' modules (:mod:`fedeq.cli.simulate`,
:mod:`fedeq.cli.deploy`) and dispatches to them; they never import it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from fedeq.cli.config_args import check_runnable, split_config_args
from fedeq.cli.config_show import add_config_parser, cmd_config
from fedeq.cli.deploy import add_deploy_parser, cmd_deploy
from fedeq.cli.simulate import add_simulate_parser, cmd_simulate
from fedeq.cli.sweep import add_sweep_parser, cmd_sweep

__all__ = [
    "build_parser",
    "check_runnable",
    "main",
    "parse_args",
    "run_command",
    "split_config_args",
    "stray_threads",
]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": cmd_simulate,
    "deploy": cmd_deploy,
    "config": cmd_config,
    "sweep": cmd_sweep,
}
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
    add_config_parser(sub)
    add_sweep_parser(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line without running it: options and ``key=value`` overrides may come in any order
    for every subcommand that takes ``[CONFIG.yaml] [key=value ...]`` (exit 2 on anything else unknown)."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # positionals after an option are left over: `fedeq deploy run cfg.yaml --nodes 3 rounds=5`
        flags = [e for e in extra if e.startswith("-")]
        if flags or not isinstance(getattr(ns, "args", None), list):
            parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
        ns.args = [*ns.args, *extra]
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    command = COMMANDS.get(ns.command)
    return command(ns) if command is not None else 2


INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)
"""Exit statuses of a command stopped by a signal."""


def stray_threads(grace_s: float) -> list[threading.Thread]:
    """Non-daemon threads other than the main one that are still alive after waiting up to ``grace_s``
    seconds for them (the interpreter would wait for them forever at exit)."""
    stray = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + grace_s
    for thread in stray:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in stray if t.is_alive()]


def run_command(argv: Sequence[str] | None = None, grace_s: float = 5.0) -> int:
    """The ``fedeq`` executable: :func:`main`, and after a signal stopped it (its clean-up done, its line
    printed), an exit that does not wait on a thread a library left blocked (a runtime's polling loop)."""
    code = main(argv)
    if code in INTERRUPTED and stray_threads(grace_s):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(run_command())
