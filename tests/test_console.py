"""What a run prints: expected events counted on the round line (not warned about), the start-up lines,
``fedeq config show`` and ``fedeq simulate --dry-run``."""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict

import clients.client_app as client_app
from fedeq.config import load_config
from fedeq.server.app import run_server
from tests.flwr_helpers import LocalGrid, task_identity

QUICK = "simulations/configs/quick.yaml"


class _InProcessGrid(LocalGrid):
    """The real ClientApp, called in this process for every node (node ``i`` is partition ``i``)."""

    def __init__(self, cfg: Any) -> None:
        self.num_nodes = cfg.num_clients
        super().__init__({pid: self._client(pid) for pid in range(self.num_nodes)})

    def node_config(self, node_id: int) -> dict[str, Any]:
        return {"partition-id": int(node_id), "num-partitions": self.num_nodes}

    def _client(self, pid: int) -> Any:
        def call(message: Message) -> Message:
            context = Context(1, pid, self.node_config(pid), RecordDict(), {})
            return client_app.app(message, context)

        return call


@pytest.fixture
def flwr_records() -> Iterator[list[logging.LogRecord]]:
    """Every record of Flower's logger (which does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # whatever an earlier run in this process left
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_offline_devices_are_counted_not_warned(tmp_path: Path, flwr_records, capsys) -> None:  # type: ignore[no-untyped-def]
    overrides = ["rounds=1", "devices.tiers.0.availability=0.3", "devices.tiers.1.availability=0.3"]
    cfg = load_config(QUICK, overrides)
    grid = _InProcessGrid(cfg)
    with task_identity(run_id=grid.run.run_id):
        run_server(grid, cfg, out_dir=tmp_path / "run")
    err = capsys.readouterr().err
    line = re.search(r"round\s+1/1 .*", err)
    assert line is not None, err
    offline = int(re.search(r" offline (\d+) ", line.group(0)).group(1))  # type: ignore[union-attr]
    assert offline > 0
    rows = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("clients_offline")] == str(offline)
    warnings = [r.getMessage() for r in flwr_records if r.levelno >= logging.WARNING]
    assert warnings == [], warnings  # neither the offline devices nor Flower's fraction_evaluate note
    said = [r.getMessage() for r in flwr_records if "offline" in r.getMessage() and "node" in r.getMessage()]
    assert len(said) == offline and all(m.count("offline:") == 1 for m in said), said


@pytest.mark.slow
def test_offline_devices_on_the_ray_engine_with_start_up_lines(tmp_path: Path, flwr_records, capsys) -> None:  # type: ignore[no-untyped-def]
    """The CLI on the Ray engine: start-up lines in order, then the round line with the offline count; one
    worker process for both tiers (same resources, one logical CPU), and no warning at all."""
    import ray

    from fedeq.cli.main import main

    assert not ray.is_initialized()
    sigterm = signal.getsignal(signal.SIGTERM)
    args = ["rounds=1", "eval.budgets=[1]", "ray.num_cpus=1", f"output_dir={tmp_path}", "run_name=r"]
    args += ["devices.tiers.0.availability=0.3", "devices.tiers.1.availability=0.3"]
    assert main(["simulate", QUICK, *args]) == 0
    err = capsys.readouterr().err
    steps = ["loading data: digits, 4 partitions", "starting Ray (1 CPU) and 1 worker", "building the model"]
    at = [err.find(step) for step in [*steps, "round   1/1 "]]
    assert -1 not in at and at == sorted(at), err
    assert re.search(r"round +1/1 .* offline [1-4] ", err), err
    assert not [r for r in flwr_records if r.levelno >= logging.WARNING]
    assert "WARNING" not in err and not ray.is_initialized()
    # the run leaves the process as it found it: SIGTERM handler (ray.init installs its own), Flower's level
    assert signal.getsignal(signal.SIGTERM) is sigterm and logging.getLogger("flwr").level == logging.DEBUG


def test_start_up_lines_go_to_stderr_unless_quiet(capsys) -> None:  # type: ignore[no-untyped-def]
    from fedeq.engines.ray.engine import startup_line

    startup_line(quiet=True)("loading data: digits")
    assert capsys.readouterr() == ("", "")
    startup_line(quiet=False)("loading data: digits")
    assert capsys.readouterr() == ("", "loading data: digits\n")


def test_tiers_with_the_same_resources_share_pools_on_a_small_machine() -> None:
    from types import SimpleNamespace

    from fedeq.engines.ray.pools import plan_grid, pool_groups

    cfg = load_config(None, ["ray.num_cpus=2"])  # four 1-CPU tiers: one actor each would need 4 CPUs
    assert plan_grid(cfg) == ([[0, 1, 2, 3]], [2], 2)
    assert plan_grid(load_config(None, ["ray.num_cpus=8"])) == ([[0], [1], [2], [3]], [2, 2, 2, 2], 8)
    for keep in ("ray.actors_per_tier=1", "ray.address=auto"):  # fixed pool sizes, or not a local cluster
        assert plan_grid(load_config(None, ["ray.num_cpus=2", keep]))[0] == [[0], [1], [2], [3]]
    tiers = [
        SimpleNamespace(name="a", share=0.5, num_cpus=1.0, num_gpus=0.0),
        SimpleNamespace(name="gpu", share=0.25, num_cpus=1.0, num_gpus=0.5),
        SimpleNamespace(name="b", share=0.25, num_cpus=1.0, num_gpus=0.0),
        SimpleNamespace(name="half", share=0.0, num_cpus=0.5, num_gpus=0.0),
    ]
    assert pool_groups(tiers, 2.0) == ([[0, 2], [1], [3]], [1, 2, 1])


def test_config_show_prints_the_resolved_config_with_descriptions(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedeq.cli.main import main
    from fedeq.config import to_yaml

    assert main(["config", "show", QUICK, "rounds=3", "devices.tiers.1.availability=0.5"]) == 0
    out = capsys.readouterr().out
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    expected = load_config(QUICK, ["rounds=3", "devices.tiers.1.availability=0.5"])
    assert to_yaml(load_config(shown)) == to_yaml(expected)  # the output is the config itself
    lines = out.splitlines()
    assert re.match(r"rounds: 3 +# Federated rounds\.$", lines[1]), lines[1]
    assert any(re.match(r"  alpha: 0\.5 +# dirichlet: ", line) for line in lines)
    assert any(re.match(r"devices: +# Device tiers", line) for line in lines)
    second_tier = lines.index("  - name: large")
    bare = [line for line in lines if "#" not in line]
    assert bare == lines[second_tier : second_tier + len(bare)]  # every key described once (tiers: the first)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["rounds=0"], "rounds"),
        (["nope=1"], "nope"),
        (["missing.yaml"], "config"),
        ([QUICK, "x"], "overrides"),
    ],
)
def test_config_show_refuses_a_bad_config_with_exit_2(args: list[str], key: str, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedeq.cli.main import main

    assert main(["config", "show", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"fedeq: error: {key}") and err.count("\n") == 1, err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedeq.cli.main import main

    args = [QUICK, f"output_dir={tmp_path}", "num_clients=6", "clients_per_round=3", "ray.num_cpus=4"]
    assert main(["simulate", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert "rounds    2, 3 of 6 clients per round" in out
    assert re.search(r"model     mlp_deq: [\d,]+ parameters", out)
    assert "a local Ray cluster with 4 logical CPUs" in out and "4 actors in 2 pools" in out
    row = r"^  (small|large) +(\d+) +(\d+) / ([\d.]+) / (\d+) "
    rows = {m.group(1): m for m in re.finditer(row, out, re.M)}
    assert set(rows) == {"small", "large"} and sum(int(m.group(2)) for m in rows.values()) == 6
    assert re.search(r"^  small .*fixed_point 2/2 jfb.* 2 actors x 1 CPU", out, re.M), out
    assert main(["simulate", "--dry-run", QUICK, "rounds=0"]) == 2
    assert capsys.readouterr().err.startswith("fedeq: error: rounds")


def test_readme_config_show_and_dry_run_lines_run(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import shlex

    from fedeq.cli.main import main
    from tests.doc_blocks import fenced_blocks

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    lines = [
        line.split("#", 1)[0].strip()
        for lang, block in fenced_blocks(root / "README.md")
        if lang == "bash"
        for line in block.splitlines()
        if line.startswith(("fedeq config show", "fedeq simulate --dry-run"))
    ]
    assert len(lines) >= 2
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
        assert capsys.readouterr().out.strip(), line
