"""`fedeq simulate` and `flwr run .`: config errors exit 2 before any work; small runs write the contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedeq.config import load_config
from fedeq.results.recorder import CLIENT_COLUMNS, ROUND_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedeq.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("rounds=abc", "rounds", "integer"),
        ("data.alpha=0", "data.alpha", "> 0"),
        ("data.name=cifar", "data.name", "digits"),
        ("devices.tiers.0.f_max_iter=0", "devices.tiers[0].f_max_iter", ">= 1"),
        ("devices.tiers.0.solver=newton", "devices.tiers[0].solver", "anderson"),
        ("devices.tiers.0.share=0.5", "devices.tiers", "sum"),
        ("model.nam=mlp_deq", "model.nam", "name"),
        ("strategy.name=nosuch", "strategy.name", "fedavg"),
        ("strategy.kwargs.bogus=1", "strategy.kwargs.bogus", "fraction_train"),
        ("data.name=npz", "data.path", "npz"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, override, key, allowed):
    res = _cli("simulate", override, f"output_dir={tmp_path / 'out'}")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert key in lines[0] and allowed in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_missing_config_file_and_stray_argument_exit_2(tmp_path):
    res = _cli("simulate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "config" in res.stderr
    res = _cli("simulate", "rounds=1", "stray")
    assert res.returncode == 2 and "overrides" in res.stderr
    res = _cli("simulate", "--no-such-flag")
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr


@pytest.mark.slow
def test_small_flower_simulation_writes_outputs_and_learns(tmp_path, capfd):
    from fedeq.engines.simulate import simulate

    cfg = load_config(QUICK, [f"output_dir={tmp_path}", "run_name=run", "engine=flower"])
    out = simulate(cfg)  # not quiet: Flower's warnings are shown, but no deprecation banner
    assert out == tmp_path / "run"
    printed = capfd.readouterr()
    assert "round   2/2" in printed.err and "deprecat" not in (printed.out + printed.err).lower()
    for name in (
        "config.yaml",
        "rounds.csv",
        "clients.csv",
        "summary.json",
        "partitions.csv",
        "accuracy.png",
        "accuracy_vs_budget.png",
    ):
        assert (out / name).is_file(), name
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds.columns[: len(ROUND_COLUMNS)]) == list(ROUND_COLUMNS)
    assert rounds["round"].tolist() == [1, 2]
    assert (rounds["clients_ok"] == cfg.clients_per_round).all()
    assert (rounds["bytes_up"] > 0).all() and (rounds["sim_time_s"] > 0).all()
    clients = pd.read_csv(out / "clients.csv")
    assert list(clients.columns) == list(CLIENT_COLUMNS)
    assert len(clients) == 2 * cfg.clients_per_round and (clients["status"] == "ok").all()
    assert set(clients["tier"]) == {t.name for t in cfg.devices.tiers}
    # Each tier trains with its own forward budget: the mean forward evaluations differ by tier.
    nfe = clients.groupby("tier")["nfe_fwd"].mean()
    assert nfe["small"] < nfe["large"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] > summary["initial_test_acc"] + 0.2
    assert load_config(out / "config.yaml").rounds == 2


def _kill_local_superlinks(flwr_home: Path) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if ("flower-superlink" in cmd or "flwr-serverapp" in cmd or "flwr-simulation" in cmd) and str(
            flwr_home
        ) in env:
            os.kill(int(proc.name), signal.SIGTERM)


@pytest.mark.slow
def test_flwr_run_uses_the_same_apps(tmp_path):
    """`flwr run .` on Flower's simulation runtime produces the same first-round accuracy as fedeq."""
    flwr = Path(sys.executable).with_name("flwr")
    if not flwr.exists():
        pytest.skip("flwr CLI not installed")
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    run_config = f'fedeq-config="{QUICK}" overrides="output_dir={tmp_path} run_name=flwr rounds=1"'
    try:
        res = subprocess.run(
            [
                str(flwr),
                "run",
                ".",
                "--run-config",
                run_config,
                "--federation-config",
                "num-supernodes=4",
                "--stream",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _kill_local_superlinks(home)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rounds = pd.read_csv(tmp_path / "flwr" / "rounds.csv")
    assert rounds["round"].tolist() == [1]
    summary = json.loads((tmp_path / "flwr" / "summary.json").read_text())
    assert summary["final_test_acc"] > summary["initial_test_acc"]


# ---------------------------------------------------------------------------------------------
# Engines are looked up by name in the registry
# ---------------------------------------------------------------------------------------------


def _recording_engine(supports_resume: bool) -> tuple[type, list]:
    from fedeq.engines.base import Engine

    calls: list = []

    class Recording(Engine):
        def run(self, cfg, out_dir, quiet=False, resume=False) -> None:  # type: ignore[no-untyped-def]
            calls.append((cfg.engine, Path(out_dir), quiet, resume))
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "summary.json").write_text("{}")

    Recording.supports_resume = supports_resume
    return Recording, calls


def test_simulate_dispatches_to_the_engine_named_in_config(tmp_path):
    from fedeq.engines.simulate import simulate
    from fedeq.registry import ENGINES

    engine, calls = _recording_engine(supports_resume=True)
    ENGINES.register("test_recording", engine)
    try:
        cfg = load_config(QUICK, [f"output_dir={tmp_path}", "run_name=run", "engine=test_recording"])
        assert simulate(cfg, quiet=True) == tmp_path / "run"
        assert simulate(cfg, resume_dir=tmp_path / "run") == tmp_path / "run"
    finally:
        ENGINES.unregister("test_recording")
    assert calls == [
        ("test_recording", tmp_path / "run", True, False),
        ("test_recording", tmp_path / "run", False, True),
    ]


def test_resume_is_refused_for_an_engine_without_resume_support(tmp_path):
    from fedeq.engines.simulate import simulate
    from fedeq.registry import ENGINES

    engine, calls = _recording_engine(supports_resume=False)
    ENGINES.register("test_no_resume", engine)
    try:
        cfg = load_config(QUICK, [f"output_dir={tmp_path}", "engine=test_no_resume"])
        with pytest.raises(ValueError, match=r"^--resume: runs on engine=test_no_resume cannot be resumed; "):
            simulate(cfg, resume_dir=tmp_path)
    finally:
        ENGINES.unregister("test_no_resume")
    assert calls == []
    flower = load_config(QUICK, [f"output_dir={tmp_path}", "engine=flower"])
    with pytest.raises(ValueError) as err:
        simulate(flower, resume_dir=tmp_path)
    assert str(err.value) == (
        "--resume: runs on engine=flower cannot be resumed (Flower's runtime owns the loop); "
        "allowed: engine=ray"
    )


def test_cli_resume_of_a_flower_run_exits_2_before_any_work(tmp_path):
    from fedeq.config import to_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(QUICK, [f"output_dir={tmp_path}", "engine=flower"])))
    (run / "checkpoint.pkl").write_bytes(b"not read")
    res = _cli("simulate", "--resume", str(run))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        "fedeq: error: --resume: only runs on engine=ray can be resumed; allowed: engine=ray (got 'flower')"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pkl", "config.yaml"]
