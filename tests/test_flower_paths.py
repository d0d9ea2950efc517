"""Flower's own paths: the command line's argument order, the ServerApp's node check, Flower's banner on
``engine=flower``, and a plain ``flwr run . --stream``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.logger import warn_deprecated_feature

from fedeq.cli.main import build_parser, parse_args
from fedeq.config import load_config
from fedeq.engines.flower import quiet_run_simulation_banner
from fedeq.server import nodes
from fedeq.server.app import make_server_app
from fedeq.server.nodes import NodeCheckError, wait_for_nodes
from tests.flwr_helpers import LocalGrid, task_identity

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Options and key=value overrides in any order, for every subcommand
# ---------------------------------------------------------------------------------------------


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


def _required_options(parser: argparse.ArgumentParser) -> list[str]:
    argv: list[str] = []
    for action in parser._actions:
        if action.option_strings and action.required:
            argv += [action.option_strings[0], "1"]
    return argv


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if not a.option_strings and a.dest != "help"]


LEAVES = list(_leaves(build_parser()))


@pytest.mark.parametrize("path, leaf", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_subcommand_takes_options_and_overrides_in_any_order(path, leaf, capsys):
    required = _required_options(leaf)
    positionals = _positionals(leaf)
    if positionals == ["args"]:
        for argv in (
            [*path, "cfg.yaml", *required, "rounds=5", "seed=1"],
            [*path, *required, "cfg.yaml", "rounds=5", "seed=1"],
            [*path, "cfg.yaml", "rounds=5", *required, "seed=1"],
            [*path, "cfg.yaml", "rounds=5", "seed=1", *required],
        ):
            ns = parse_args(argv)
            assert ns.args == ["cfg.yaml", "rounds=5", "seed=1"], argv
    elif not positionals:  # no config arguments: a stray one is refused with one line, exit 2
        with pytest.raises(SystemExit) as exit_info:
            parse_args([*path, *required, "rounds=5"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == "fedeq: error: unrecognized arguments: rounds=5"
    else:
        pytest.skip(f"{' '.join(path)} takes other positionals: {positionals}")


def test_documented_commands_parse_with_overrides_after_options():
    ns = parse_args(["deploy", "run", "simulations/configs/quick.yaml", "--nodes", "3", "rounds=5"])
    assert (ns.deploy_command, ns.nodes, ns.args) == (
        "run",
        3,
        ["simulations/configs/quick.yaml", "rounds=5"],
    )
    ns = parse_args(["deploy", "run", "--nodes", "4", "--tiers", "a,b,c,d", "output_dir=o", "run_name=r"])
    assert (ns.nodes, ns.tiers, ns.args) == (4, "a,b,c,d", ["output_dir=o", "run_name=r"])
    ns = parse_args(
        ["deploy", "submit", "c.yaml", "--superlink", "127.0.0.1:8000", "rounds=10", "--nodes", "2", "x=1"]
    )
    assert (ns.superlink, ns.nodes, ns.args) == ("127.0.0.1:8000", 2, ["c.yaml", "rounds=10", "x=1"])
    ns = parse_args(["simulate", "c.yaml", "--quiet", "rounds=5"])
    assert ns.quiet and ns.args == ["c.yaml", "rounds=5"]


def test_an_unknown_option_after_overrides_still_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["deploy", "run", "rounds=5", "--nodes", "3", "--bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "fedeq: error: unrecognized arguments: --bogus"


# ---------------------------------------------------------------------------------------------
# The ServerApp's node check
# ---------------------------------------------------------------------------------------------


def _grid(num_nodes: int) -> LocalGrid:
    return LocalGrid({1000 + i: lambda message: RecordDict() for i in range(num_nodes)})


class _JoiningGrid(LocalGrid):
    """Nodes connect one per call of ``get_node_ids``."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__({})
        self.pending = [1000 + i for i in range(num_nodes)]

    def get_node_ids(self) -> list[int]:
        if self.pending:
            self.clients[self.pending.pop(0)] = lambda message: RecordDict()
        return list(self.clients)


def test_serverapp_fails_fast_naming_the_numbers_and_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(nodes, "NODE_WAIT_S", 0.0)
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=run"])
    grid = _grid(2)
    app = make_server_app(cfg, quiet=True)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with task_identity(run_id=grid.run.run_id), pytest.raises(NodeCheckError) as err:
        app(grid=grid, context=context)
    assert str(err.value) == (
        "the run needs 20 connected nodes (num_clients=20) but 2 connected within 0 s; start 20 SuperNodes "
        '(flwr run: --federation-config "num-supernodes=20"; fedeq deploy: --nodes 20), '
        "or run fewer clients: num_clients=2 clients_per_round=2"
    )
    assert not (tmp_path / "run").exists()  # nothing written


def test_node_check_names_min_available_nodes_and_waits_for_joining_nodes():
    cfg = load_config(None, ["strategy.min_available_nodes=3"])
    with pytest.raises(NodeCheckError) as err:
        wait_for_nodes(_grid(0), cfg, timeout_s=0)
    assert str(err.value).startswith(
        "the run needs 3 connected nodes (num_clients=20, strategy.min_available_nodes=3) but 0 connected"
    )
    assert "fewer clients" not in str(err.value)
    assert wait_for_nodes(_JoiningGrid(3), cfg, timeout_s=30, poll_s=0.01) == [1000, 1001, 1002]


# ---------------------------------------------------------------------------------------------
# engine=flower: Flower's deprecation banner for run_simulation is dropped, nothing else
# ---------------------------------------------------------------------------------------------


def test_only_the_run_simulation_banner_is_dropped():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.DEBUG)  # whatever an earlier run in this process left
    flwr_logger.addHandler(handler)
    try:
        with quiet_run_simulation_banner():
            warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
            warn_deprecated_feature("Something else is deprecated")
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
    finally:
        flwr_logger.removeHandler(handler)
        flwr_logger.setLevel(level)
    texts = [record.getMessage() for record in records]
    assert len(texts) == 2
    assert "Something else is deprecated" in texts[0] and "run_simulation" in texts[1]


# ---------------------------------------------------------------------------------------------
# A plain `flwr run . --stream`
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_with_home(flwr_home: Path) -> list[int]:
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _stop_processes_with_home(flwr_home: Path) -> None:
    """Stop what `flwr run` left behind (its local SuperLink and helpers), found by their FLWR_HOME."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_with_home(flwr_home):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _processes_with_home(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.mark.slow
def test_plain_flwr_run_fails_fast_with_the_node_check(tmp_path):
    """`flwr run . --stream` on Flower's default federation (2 SuperNodes) with the embedded default (20
    clients) stops at the node check instead of waiting forever, and builds no runtime environment."""
    flwr = Path(sys.executable).with_name("flwr")
    if not flwr.exists():
        pytest.skip("flwr CLI not installed")
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),  # a private local SuperLink
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    run_config = f'overrides="output_dir={tmp_path / "out"}"'
    try:
        res = subprocess.run(
            [str(flwr), "run", ".", "--stream", "--run-config", run_config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        _stop_processes_with_home(home)
    log = res.stdout + res.stderr
    assert (
        "the run needs 20 connected nodes (num_clients=20) but 2 connected within 10 s; start 20 SuperNodes "
        '(flwr run: --federation-config "num-supernodes=20"'
    ) in log, log[-3000:]
    assert not (home / "runtime-envs").exists()  # no environment built: the installed fedeq ran
    assert not (tmp_path / "out").exists()
