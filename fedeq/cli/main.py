"""The ``fedeq`` command line.

``fedeq simulate [CONFIG.yaml] [key=value ...]`` runs a simulation (the embedded default without CONFIG).
A bad config or argument exits with status 2 and one line naming the key, before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedeq.config.core import ConfigError, load_config


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
    sim.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        help="continue an interrupted run from its folder (its config.yaml and checkpoint.pkl)",
    )
    # fedeq deploy ...: real Flower SuperLink / SuperNodes (fedeq/deploy/cli.py)
    from fedeq.cli.deploy import add_deploy_parser

    add_deploy_parser(sub)
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

    from fedeq.server.app import strategy_for

    data = cfg.data  # type: ignore[attr-defined]
    for key in ("path", "test_path"):
        value = getattr(data, key)
        if data.name == "npz" and value is not None and not Path(value).is_file():
            raise ConfigError(
                f"data.{key}", "file not found", "an existing .npz file with arrays x and y", value
            )
    strategy_for(cfg)


def cmd_simulate(ns: argparse.Namespace) -> int:
    from pathlib import Path

    resume = Path(ns.resume) if ns.resume else None
    try:
        if resume is not None:
            if ns.args:
                raise ConfigError(
                    "--resume", "takes no config or overrides", "--resume OUTPUT_DIR alone", ns.args
                )
            if not (resume / "checkpoint.pkl").is_file() or not (resume / "config.yaml").is_file():
                raise ConfigError(
                    "--resume", "no checkpoint.pkl and config.yaml", "a fedeq run folder", str(resume)
                )
            cfg = load_config(resume / "config.yaml")
            if cfg.engine != "ray":
                raise ConfigError(
                    "--resume", "only runs on engine=ray can be resumed", "engine=ray", cfg.engine
                )
            from fedeq.results.checkpoint import load_checkpoint

            try:  # a damaged checkpoint or journal stops here, not mid-run
                load_checkpoint(resume, truncate=False)
            except ValueError as err:
                problem = str(err).removeprefix("--resume: ")
                allowed = "checkpoint.pkl and checkpoint.journal as fedeq wrote them"
                raise ConfigError("--resume", problem, allowed, str(resume)) from err
        else:
            path, overrides = split_config_args(ns.args)
            cfg = load_config(path, overrides)
        check_runnable(cfg)
    except (ConfigError, ValueError) as err:
        print(f"fedeq: error: {err}", file=sys.stderr)
        return 2
    from fedeq.engines.simulate import simulate

    out = simulate(cfg, quiet=ns.quiet, resume_dir=resume)
    print(f"results written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options: `fedeq simulate cfg.yaml --quiet rounds=5`
        flags = [e for e in extra if e.startswith("-")]
        if ns.command != "simulate" or flags:
            parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
        ns.args = [*ns.args, *extra]
    if ns.command == "simulate":
        return cmd_simulate(ns)
    if ns.command == "deploy":
        from fedeq.cli.deploy import cmd_deploy

        return cmd_deploy(ns)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
