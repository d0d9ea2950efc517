"""fedeq's Ray device engine: Grid contract, per-tier pools, simulated clock, faults, kill-and-resume."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedeq.config import RUN_CONFIG_KEY, load_config, to_yaml  # noqa: E402
from fedeq.devices.clock import client_sim_time  # noqa: E402
from fedeq.engines.ray.engine import make_grid, server_identity  # noqa: E402
from fedeq.engines.ray.grid import RayGrid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def _quick(tmp_path: Path, *overrides: str):
    return load_config(QUICK, ["engine=ray", f"output_dir={tmp_path}", *overrides])


def _run(cfg):
    from fedeq.engines.simulate import simulate

    return simulate(cfg, quiet=True)


def test_flower_fedavg_runs_unchanged_on_the_ray_grid(tmp_path):
    cfg = _quick(tmp_path)
    grid = make_grid(cfg)
    from fedeq.data import load_dataset
    from fedeq.models import build_model

    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)
    initial = ArrayRecord(model.state_dict())
    try:
        with server_identity():
            result = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=2,
                train_config=ConfigRecord({RUN_CONFIG_KEY: to_yaml(cfg)}),
            )
    finally:
        grid.shutdown()
    assert set(result.train_metrics_clientapp) == {1, 2}
    losses = [result.train_metrics_clientapp[r]["train-loss"] for r in (1, 2)]
    assert 0 < losses[1] < losses[0]
    changed = [not np.array_equal(result.arrays[k].numpy(), initial[k].numpy()) for k in initial.keys()]
    assert any(changed)


def test_tiers_run_in_their_own_pools_with_their_own_resources():
    tiers = [
        SimpleNamespace(name="cpu1", share=0.5, num_cpus=1.0, num_gpus=0.0),
        SimpleNamespace(name="cpu-half", share=0.5, num_cpus=0.5, num_gpus=0.0),
    ]
    grid = RayGrid(tiers, [0, 1, 0, 1, 0, 1], app_ref="tests.apps:probe_app", sizes=[1, 2])
    try:
        with server_identity():
            msgs = [
                Message(RecordDict({"arrays": ArrayRecord([np.ones(3)])}), nid, MessageType.TRAIN)
                for nid in grid.get_node_ids()
            ]
            replies = grid.send_and_receive(msgs)
    finally:
        grid.shutdown()
    metrics = [dict(r.content["metrics"]) for r in replies]
    # Replies come back in the order the messages were sent.
    assert [m["partition-id"] for m in metrics] == list(range(6))
    pids = {0: {m["pid"] for m in metrics[0::2]}, 1: {m["pid"] for m in metrics[1::2]}}
    assert not pids[0] & pids[1]
    assert len(pids[0]) == 1 and len(pids[1]) <= 2
    assert {m["cpus"] for m in metrics[0::2]} == {1.0}
    assert {m["cpus"] for m in metrics[1::2]} == {0.5}


def test_simulated_time_follows_the_formula(tmp_path):
    cfg = _quick(tmp_path, "run_name=clock")
    out = _run(cfg)
    clients = pd.read_csv(out / "clients.csv")
    rounds = pd.read_csv(out / "rounds.csv")
    import json

    model_bytes = json.loads((out / "summary.json").read_text())["model_bytes"]
    tiers = {t.name: t for t in cfg.devices.tiers}
    for row in clients.itertuples():
        expect = client_sim_time(
            tiers[row.tier],
            nfe_fwd=row.nfe_fwd,
            nfe_bwd=row.nfe_bwd,
            samples=row.num_examples * cfg.train.local_epochs,
            bytes_down=model_bytes,
            bytes_up=model_bytes,
            nfe_cost_s=cfg.devices.nfe_cost_s,
        ).total_s
        assert row.sim_time_s == pytest.approx(expect, rel=1e-9)
    per_round = clients.groupby("round")["sim_time_s"].max()
    np.testing.assert_allclose(rounds["sim_time_s"], per_round.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(rounds["cum_sim_time_s"], np.cumsum(per_round.to_numpy()), rtol=1e-12)
    # The slow tier (speed 0.5, thin link) is the straggler even with the smaller budget.
    assert (
        clients[clients.tier == "small"].sim_time_s.min() > clients[clients.tier == "large"].sim_time_s.max()
    )


def test_deadline_drop_and_partial_work(tmp_path):
    # From the formula: 'small' clients need ~0.42 simulated s per round, 'large' ones ~0.3 s.
    cfg = _quick(tmp_path, "run_name=drop", "devices.deadline_s=0.35", "rounds=1")
    out = _run(cfg)
    clients = pd.read_csv(out / "clients.csv")
    rounds = pd.read_csv(out / "rounds.csv")
    assert set(clients[clients.status == "dropped"].tier) == {"small"}
    assert (clients[clients.tier == "large"].status == "ok").all()
    assert rounds.clients_dropped.tolist() == [2] and rounds.sim_time_s.tolist() == [0.35]

    cfg = _quick(
        tmp_path, "run_name=partial", "devices.deadline_s=0.35", "devices.deadline_policy=partial", "rounds=1"
    )
    out = _run(cfg)
    clients = pd.read_csv(out / "clients.csv")
    assert (clients.status == "ok").all()
    small = clients[clients.tier == "small"]
    # The slow devices stop early: their simulated time fits (within one step) and they did less work.
    assert (small.sim_time_s <= 0.35 + 32 * 3 * cfg.devices.nfe_cost_s / 0.5 + 1e-9).all()
    full = pd.read_csv(tmp_path / "drop" / "clients.csv")
    assert small.sim_time_s.max() < full[full.tier == "small"].sim_time_s.min()


def test_availability_is_seeded(tmp_path):
    overrides = ["devices.tiers.0.availability=0.5", "devices.tiers.1.availability=0.5", "rounds=3"]
    a = pd.read_csv(_run(_quick(tmp_path, "run_name=a", *overrides)) / "clients.csv")
    b = pd.read_csv(_run(_quick(tmp_path, "run_name=b", *overrides)) / "clients.csv")
    assert (a.status == "offline").any() and (a.status == "ok").any()
    assert a.status.tolist() == b.status.tolist()
    assert a[a.status == "offline"].reason.str.startswith("offline").all()


def test_failures_do_not_stop_the_run(tmp_path):
    cfg = _quick(
        tmp_path,
        "run_name=faults",
        "rounds=3",
        "seed=3",
        "faults.raise_p=0.25",
        "faults.hang_p=0.25",
        "faults.nan_p=0.25",
        "faults.hang_s=60",
        "ray.call_timeout_s=6",
        "ray.cohort_size=1",  # one client per call: the grid itself cuts the hung calls
    )
    t0 = time.perf_counter()
    out = _run(cfg)
    assert time.perf_counter() - t0 < 120  # hung calls were cut at the per-call limit, not waited for
    rounds = pd.read_csv(out / "rounds.csv")
    clients = pd.read_csv(out / "clients.csv")
    assert rounds["round"].tolist() == [1, 2, 3]
    reasons = clients.reason.fillna("")
    assert reasons.str.contains("injected fault").any()
    assert reasons.str.contains("timeout").any()
    assert (clients[reasons.str.contains("not finite")].status == "rejected").all()
    assert reasons.str.contains("not finite").any()
    failed = clients[clients.status == "failed"]
    assert failed.tier.notna().all() and failed.partition.notna().all()
    assert (
        rounds.clients_ok + rounds.clients_failed + rounds.clients_rejected == cfg.clients_per_round
    ).all()
    assert np.isfinite(rounds.test_acc).all()


def _kill_tree(tmpdir: Path) -> None:
    """Kill the Ray processes that a child run started under ``tmpdir`` (by pid)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(tmpdir).encode() in cmd or str(tmpdir).encode() in env:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_kill_and_resume_is_bit_identical(tmp_path):
    overrides = ["rounds=5", "train.jac_reg=0.05", "strategy.name=fedadam", "strategy.kwargs.eta=0.01"]
    ref = _run(_quick(tmp_path, "run_name=ref", *overrides))

    ray_tmp = Path(tempfile.mkdtemp(prefix="fq", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "FEDEQ_TEST_MARKER": str(ray_tmp)}
    args = [
        sys.executable,
        "-m",
        "fedeq.cli.main",
        "simulate",
        str(QUICK),
        "engine=ray",
        f"output_dir={tmp_path}",
        "run_name=killed",
        "--quiet",
        *overrides,
    ]
    proc = subprocess.Popen(
        args, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpt = tmp_path / "killed" / "checkpoint.pkl"
    killed_after = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists():
                with open(ckpt, "rb") as fh:
                    killed_after = pickle.load(fh)["round"]
                if killed_after >= 2:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=30)
        _kill_tree(ray_tmp)
    assert killed_after is not None and 2 <= killed_after < 5, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "global_model.pt").exists()

    res = subprocess.run(
        [sys.executable, "-m", "fedeq.cli.main", "simulate", "--resume", str(tmp_path / "killed"), "--quiet"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _kill_tree(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]

    a = torch.load(ref / "global_model.pt")
    b = torch.load(tmp_path / "killed" / "global_model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = pd.read_csv(ref / "rounds.csv").drop(columns=["wall_s"])
    rb = pd.read_csv(tmp_path / "killed" / "rounds.csv").drop(columns=["wall_s"])
    pd.testing.assert_frame_equal(ra, rb)
    timings = ["compute_s", "compute_cpu_s", "node_id"]
    ca = pd.read_csv(ref / "clients.csv").drop(columns=timings)
    cb = pd.read_csv(tmp_path / "killed" / "clients.csv").drop(columns=timings)
    pd.testing.assert_frame_equal(ca, cb)


def test_flower_task_identity_slots_that_server_identity_restores() -> None:
    """``server_identity`` saves and restores Flower's private ``TaskIdentity`` slots (the public getters
    raise while unset); flwr is pinned to 1.41.x for this, and this test fails if the slots change."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedeq.engines.ray.engine import server_identity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    with server_identity(run_id=7):
        assert (TaskIdentity.task_id, TaskIdentity.run_id) == (7, 7)
        assert (TaskIdentity._task_id, TaskIdentity._run_id) == (7, 7)
    assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == before
