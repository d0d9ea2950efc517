"""``fedeq sweep``: grid expansion and skipping, finished and interrupted runs, the summary's statistics,
bad grids, and one small sweep end to end."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import fedeq.cli.sweep as sweep_cli
from fedeq.cli.main import main
from fedeq.cli.sweep_plan import expand, parse_grid, split_values
from fedeq.results.sweep_summary import SweepRun, mean_ci, mean_curves, summary_frame, sweep_frame

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "simulations" / "configs" / "quick.yaml")
STRATEGY_GRID = [
    "--grid",
    "strategy.name=fedavg,quality",
    "--grid",
    "strategy.kwargs.quality=residual,val_loss",
]
T_975_2 = 4.302652729911275
"""t quantile 0.975 with 2 degrees of freedom (statistical tables)."""


def _fake_run(folder: Path, accs: list[float], sim: list[float] | None = None, bytes_: int = 100) -> None:
    """A finished run folder as fedeq writes it (only the files the sweep reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    sim = sim or [1.0] * len(accs)
    rounds = pd.DataFrame(
        {
            "round": range(1, len(accs) + 1),
            "wall_s": 0.1,
            "sim_time_s": sim,
            "cum_sim_time_s": pd.Series(sim).cumsum(),
            "test_acc": accs,
            "test_loss": 1.0,
            "bytes_up": bytes_,
            "bytes_down": bytes_,
            "clients_ok": 4,
            "test_acc@small": [a - 0.1 for a in accs],
            "test_acc@large": accs,
        }
    )
    rounds.to_csv(folder / "rounds.csv", index=False)
    summary = {"initial_eval": {"test_acc": 0.1}, "wall_s": 1.0, "rounds_completed": len(accs)}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(f"rounds: {len(accs)}\n")


def test_split_values_keeps_brackets_and_quotes() -> None:
    assert split_values("1,[2,3],'a,b', x") == ["1", "[2,3]", "'a,b'", "x"]


def test_expansion_drops_keys_that_do_not_apply() -> None:
    grid = parse_grid(["strategy.name=fedavg,quality", "strategy.kwargs.quality=residual,val_loss"])
    points = expand(QUICK, [], grid)
    assert [p.values for p in points] == [
        {"strategy.name": "fedavg"},
        {"strategy.name": "quality", "strategy.kwargs.quality": "residual"},
        {"strategy.name": "quality", "strategy.kwargs.quality": "val_loss"},
    ]
    assert [p.slug for p in points] == [
        "name=fedavg",
        "name=quality__quality=residual",
        "name=quality__quality=val_loss",
    ]
    rule = expand(QUICK, [], parse_grid(["data.partition=iid,dirichlet", "data.alpha=0.1,1.0"]))
    assert [p.values for p in rule] == [
        {"data.partition": "iid"},
        {"data.partition": "dirichlet", "data.alpha": "0.1"},
        {"data.partition": "dirichlet", "data.alpha": "1.0"},
    ]


@pytest.mark.parametrize(
    ("grid", "key"),
    [
        ("strategy.foo=1,2", "strategy.foo"),  # unknown key
        ("train.lr=0.1,-1", "train.lr"),  # a value that fails validation
        ("strategy.kwargs.bogus=1,2", "strategy.kwargs.bogus"),  # accepted by no strategy of the sweep
        ("seed=1,2", "seed"),  # seeds come from --seeds
        ("rounds", "--grid"),  # no values
    ],
)
def test_bad_grid_exits_2_naming_the_key(grid: str, key: str, tmp_path: Path, capsys: Any) -> None:
    code = main(["sweep", QUICK, "--grid", grid, "--out", str(tmp_path / "sw")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"fedeq: error: {key}:") and "\n" not in err
    assert not (tmp_path / "sw").exists()


def test_value_refused_by_the_strategy_exits_2_before_any_run(tmp_path: Path, capsys: Any) -> None:
    args = ["strategy.name=quality", "--grid", "strategy.kwargs.quality=residual,nonsense"]
    code = main(["sweep", QUICK, *args, "--out", str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert code == 2 and "strategy.kwargs.quality" in err and "nonsense" in err
    assert not (tmp_path / "sw").exists()


def test_mean_and_interval_match_a_hand_computation(tmp_path: Path) -> None:
    finals = [0.5, 0.6, 0.9]
    curves = [[0.4, 0.5], [0.6, 0.6], [0.3, 0.9]]  # target 0.55: not reached, round 1, round 2
    runs = []
    for seed, accs in enumerate(curves):
        _fake_run(tmp_path / f"seed-{seed}", accs, sim=[1.0 + seed, 2.0], bytes_=100 * (seed + 1))
        runs.append(SweepRun("p", {"k": "v"}, seed, tmp_path / f"seed-{seed}"))
    sweep = sweep_frame(runs, ["k"], target=0.55, out=tmp_path)
    assert list(sweep["final_acc"]) == finals
    assert list(sweep["rounds_to_target"].fillna(-1)) == [-1, 1, 2]
    row = summary_frame(sweep, ["k"], target=0.55).iloc[0]
    mean = (0.5 + 0.6 + 0.9) / 3
    s = math.sqrt(((0.5 - mean) ** 2 + (0.6 - mean) ** 2 + (0.9 - mean) ** 2) / 2)
    assert row["final_acc_mean"] == pytest.approx(mean)
    assert row["final_acc_ci95"] == pytest.approx(T_975_2 * s / math.sqrt(3))
    assert row["final_acc@small_mean"] == pytest.approx(mean - 0.1)
    # "to target" means are over the seeds that reached it: seed 1 at round 1, seed 2 at round 2
    assert row["reached"] == 2 and row["rounds_to_target_mean"] == pytest.approx(1.5)
    assert row["rounds_to_target_ci95"] == pytest.approx(12.706204736174698 * math.sqrt(0.5) / math.sqrt(2))
    # simulated time: seed 1 at 2, seed 2 at 3 + 2; bytes up + down, cumulated: 2 * 200, 2 * 2 * 300
    assert row["sim_time_to_target_s_mean"] == pytest.approx((2 + 5) / 2)
    assert row["bytes_to_target_mean"] == pytest.approx((400 + 1200) / 2)
    not_reached = summary_frame(sweep_frame(runs, ["k"], 0.95, tmp_path), ["k"], 0.95).iloc[0]
    assert not_reached["reached"] == 0 and math.isnan(not_reached["rounds_to_target_mean"])
    mean1, half1, n1 = mean_ci([0.7, math.nan])  # one finite value: a mean, no interval
    assert (mean1, n1) == (0.7, 1) and math.isnan(half1)


def test_curves_hold_each_seeds_last_round_until_the_next(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a", [0.5, 0.7], sim=[1.0, 1.0])
    _fake_run(tmp_path / "b", [0.3, 0.9], sim=[2.0, 2.0])
    runs = [SweepRun("p", {}, 0, tmp_path / "a"), SweepRun("p", {}, 1, tmp_path / "b")]
    curve = mean_curves(runs, "sim_time")["p"]
    assert list(curve["x"]) == [0.0, 1.0, 2.0]  # up to seed a's last point
    assert list(curve["mean"]) == pytest.approx([0.1, (0.5 + 0.1) / 2, (0.7 + 0.3) / 2])
    assert list(mean_curves(runs, "round")["p"]["mean"]) == pytest.approx([0.1, 0.4, 0.8])


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Runs replaced by fake finished folders (no Ray, no training); the calls as (folder, state)."""
    calls: list[tuple[str, str]] = []

    def run(folder: Path, cfg: Any, state: str, verbose: bool) -> None:
        calls.append((str(folder.relative_to(folder.parents[2])), state))
        offset = 0.1 * cfg.seed + (0.05 if cfg.strategy.name == "quality" else 0.0)
        _fake_run(folder, [0.5 + offset, 0.6 + offset][: cfg.rounds])

    monkeypatch.setattr(sweep_cli, "_run", run)
    monkeypatch.setattr(sweep_cli, "_start_ray", lambda cfgs: False)
    monkeypatch.setattr(sweep_cli, "check_runnable", lambda cfg: None)
    return calls


def test_sweep_skips_finished_runs_and_resumes_an_interrupted_one(
    tmp_path: Path, fake_runs: list[tuple[str, str]], capsys: Any
) -> None:
    out = tmp_path / "sw"
    argv = ["sweep", QUICK, *STRATEGY_GRID, "--seeds", "2", "--out", str(out), "--target-acc", "0.62"]
    assert main(argv) == 0
    assert len(fake_runs) == 6 and {s for _, s in fake_runs} == {"new"}
    sweep = pd.read_csv(out / "sweep.csv")
    assert len(sweep) == 6 and sweep["strategy.kwargs.quality"].isna().sum() == 2  # fedavg: no quality
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["seeds"]) == [2, 2, 2] and list(summary["reached"]) == [1, 2, 2]
    for name in (
        "sweep_accuracy_vs_round.png",
        "sweep_accuracy_vs_sim_time.png",
        "sweep_accuracy_vs_bytes.png",
    ):
        assert (out / name).is_file()
    # An interrupted run (a checkpoint, no final summary) and a run never started.
    stopped = out / "runs" / "name=fedavg" / "seed-1"
    (stopped / "summary.json").write_text(json.dumps({"rounds_completed": 1}))
    (stopped / "checkpoint.pkl").write_bytes(pickle.dumps({"round": 1}))
    missing = out / "runs" / "name=quality__quality=val_loss" / "seed-0"
    for path in missing.iterdir():
        path.unlink()
    missing.rmdir()
    fake_runs.clear()
    capsys.readouterr()
    assert main(argv) == 0
    assert fake_runs == [
        ("runs/name=fedavg/seed-1", "resume"),
        ("runs/name=quality__quality=val_loss/seed-0", "new"),
    ]
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 4 and "resuming after round 1" in printed
    assert "sweep summary" in printed


def test_a_folder_of_another_sweep_is_refused(tmp_path: Path, fake_runs: list[Any], capsys: Any) -> None:
    out = str(tmp_path / "sw")
    assert main(["sweep", QUICK, "rounds=1", "--grid", "strategy.name=fedavg,quality", "--out", out]) == 0
    capsys.readouterr()
    assert main(["sweep", QUICK, "rounds=2", "--grid", "strategy.name=fedavg,quality", "--out", out]) == 2
    assert "--out" in capsys.readouterr().err  # another config
    assert main(["sweep", QUICK, "rounds=1", "--grid", "train.lr=0.1,0.2", "--out", out]) == 2
    assert "different grid" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert main(["sweep", QUICK, "--grid", "rounds=1,2", "--out", str(tmp_path / "other")]) == 2
    assert "not a fedeq sweep folder" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_the_command_to_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_runs: list[Any], capsys: Any
) -> None:
    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_cli, "_run", interrupted)
    out = tmp_path / "sw"
    assert main(["sweep", QUICK, "--grid", "strategy.name=fedavg,quality", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"fedeq sweep {QUICK} --grid strategy.name=fedavg,quality --out {out}" in err


@pytest.mark.slow
def test_a_small_sweep_end_to_end(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "sw"
    argv = ["sweep", QUICK, "rounds=1", "--grid", "strategy.name=fedavg,quality", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] name=fedavg, seed=0: final" in printed and "sweep summary" in printed
    sweep = pd.read_csv(out / "sweep.csv")
    assert list(sweep["status"]) == ["done", "done"] and (sweep["final_acc"] > 0.3).all()
    assert {"final_acc@small", "final_acc@large"} <= set(sweep.columns)
    assert (out / "runs" / "name=quality" / "seed-0" / "global_model.pt").is_file()
    assert main(argv) == 0  # everything finished: nothing runs again
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_plot_studies_draws_several_sweeps_in_one_figure(tmp_path: Path) -> None:
    """``simulations/plot_studies.py``: one line per grid point of every sweep, a sweep with one point named
    by its label; a folder without ``sweep.csv`` exits 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_studies", ROOT / "simulations" / "plot_studies.py")
    assert spec is not None and spec.loader is not None
    plot_studies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_studies)
    for name, points in [("methods", ["name=fedavg", "name=fedprox"]), ("bound", ["base"])]:
        rows = []
        for p, point in enumerate(points):
            for seed in (0, 1):
                run_dir = f"runs/{point}/seed-{seed}"
                _fake_run(tmp_path / name / run_dir, [0.5 + 0.1 * p, 0.6 + 0.1 * p + 0.01 * seed])
                rows.append({"point": point, "seed": seed, "status": "done", "run_dir": run_dir})
        pd.DataFrame(rows).to_csv(tmp_path / name / "sweep.csv", index=False)
    runs = plot_studies.sweep_folder_runs(tmp_path / "methods", None)
    runs += plot_studies.sweep_folder_runs(tmp_path / "bound", "upper bound")
    assert sorted({r.point for r in runs}) == ["name=fedavg", "name=fedprox", "upper bound"]
    out = tmp_path / "fig.png"
    argv = [str(out), str(tmp_path / "methods"), f"{tmp_path / 'bound'}=upper bound", "--axis", "round"]
    assert plot_studies.main(argv) == 0 and out.stat().st_size > 1000
    assert plot_studies.main([str(out), str(tmp_path / "nowhere")]) == 2
