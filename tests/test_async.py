"""Buffered asynchronous aggregation (``aggregation=async``, FedBuff): arrivals follow the simulated clock,
the buffer size and staleness weights are applied as documented, runs repeat exactly for a seed, and a
killed run resumes to the numbers of an uninterrupted one."""

from __future__ import annotations

import math
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedeq.arrays import record_to_numpy
from fedeq.results.checkpoint import checkpoint_round
from fedeq.server.async_loop import AsyncSettings, run_async, staleness_check
from fedeq.server.async_schedule import AsyncState
from strategies.guard import ReplyGuard
from strategies.staleness import rebase, staleness_weight
from tests.flwr_helpers import LocalGrid, task_identity, to_array_record
from tests.inprocess_engine import SIGNAL_AT, registered, simulate_cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
TINY = [
    "engine=async_local", "num_clients=4", "eval.budgets=[1]", "model.hidden=16", "train.batch_size=128",
    "devices.tiers.1.solver=fixed_point", "devices.tiers.1.backward=jfb", "devices.tiers.1.f_max_iter=3",
    "devices.tiers.1.b_max_iter=2", "aggregation=async", "async.buffer_size=2", "async.concurrency=3",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the loop


def _client(delta: float, duration: float):  # type: ignore[no-untyped-def]
    """A client that adds ``delta`` to every weight it receives and reports ``duration`` simulated s."""

    def run(message: Message) -> RecordDict:
        w = record_to_numpy(message.content.array_records["arrays"])["w"]
        metrics = {"num-examples": 10, "dur": duration}
        return RecordDict({"arrays": to_array_record({"w": w + delta}), "metrics": MetricRecord(metrics)})

    return run


def _run(clients: Mapping[int, tuple[float, float]], settings: AsyncSettings, versions: int):  # type: ignore[no-untyped-def]
    """Run the asynchronous loop over in-process clients (node -> (delta, duration)); return the final
    arrays, the per-update records ``(version, time, extras)`` and the guard."""
    grid = LocalGrid({node: _client(*spec) for node, spec in clients.items()})
    guard = ReplyGuard(FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1))
    guard.reply_checks.append(staleness_check(settings.max_staleness))  # as run_server adds it
    updates: list[tuple[int, float, list[dict[str, Any]]]] = []
    with task_identity(run_id=grid.run.run_id):
        result = run_async(
            guard,
            grid,
            to_array_record({"w": np.zeros(2, dtype=np.float32)}),
            versions,
            settings,
            AsyncState(seed=0),
            duration=lambda reply: float(reply.content.metric_records["metrics"]["dur"]),  # type: ignore[arg-type]
            on_update=lambda v, t, extras: updates.append((v, t, extras)),
        )
    return record_to_numpy(result.arrays)["w"], updates, guard


def test_arrivals_follow_the_simulated_clock_with_ties_to_the_earlier_dispatch() -> None:
    # three clients always busy, one reply per update: node 1 takes 1 s, node 2 2.5 s, node 3 4 s
    settings = AsyncSettings(buffer_size=1, concurrency=3, staleness="constant")
    _, updates, guard = _run({1: (1.0, 1.0), 2: (1.0, 2.5), 3: (1.0, 4.0)}, settings, versions=6)
    times = [t for _, t, _ in updates]
    nodes = [e["node_id"] for e in guard.client_log]
    assert times == [1.0, 2.0, 2.5, 3.0, 4.0, 4.0]
    # at t=4 node 3 (sent at t=0) goes before node 1 (sent at t=3): ties go to the lower dispatch index
    assert nodes == [1, 1, 2, 1, 3, 1]
    arrivals = [(x["arrival_s"], x["dispatch"]) for _, _, extras in updates for x in extras]
    assert arrivals == sorted(arrivals)
    assert [x["start_s"] for _, _, extras in updates for x in extras] == [0.0, 1.0, 0.0, 2.0, 0.0, 3.0]
    # staleness: versions made since the model the client started from
    assert [x["staleness"] for _, _, extras in updates for x in extras] == [0, 0, 2, 1, 4, 1]


def test_buffer_of_k_replies_with_staleness_weights_by_hand() -> None:
    # K=2, three clients: +1 in 1 s, +10 in 2 s, +100 in 3.5 s; equal sample counts: FedAvg's p_i = 1/K
    settings = AsyncSettings(buffer_size=2, concurrency=3, staleness="polynomial", staleness_exponent=0.5)
    w, updates, guard = _run({1: (1.0, 1.0), 2: (10.0, 2.0), 3: (100.0, 3.5)}, settings, versions=2)
    # v1 at t=2: node 1 (t=1, τ=0) and node 2 (t=2, τ=0; before node 1's second call, dispatched later)
    # v2 at t=3: node 1 sent at t=1 on v0 (τ=1) and node 1 sent at t=2 on v1 (τ=0)
    v1 = 0.5 * (1.0 + 10.0)
    v2 = v1 + 0.5 * (1.0 / math.sqrt(2.0) * 1.0 + 1.0 * 1.0)
    np.testing.assert_allclose(w, [v2, v2], rtol=1e-6)
    assert [(v, t) for v, t, _ in updates] == [(1, 2.0), (2, 3.0)]
    assert [[x["staleness"] for x in extras] for _, _, extras in updates] == [[0, 0], [1, 0]]
    weights = [[x["staleness_weight"] for x in extras] for _, _, extras in updates]
    assert weights == [[1.0, 1.0], [pytest.approx(2**-0.5), 1.0]]
    assert [guard.round_counts[v]["ok"] for v in (1, 2)] == [2, 2]  # K replies per update


def test_server_lr_and_max_staleness() -> None:
    # η_g = 2 doubles the step; with max_staleness=0 the calls sent on v0 that arrive after v1 (node 1 at
    # t=2, node 3 at t=3.5, τ=1) are dropped, not buffered
    settings = AsyncSettings(
        buffer_size=2, concurrency=3, staleness="constant", server_lr=2.0, max_staleness=0
    )
    w, updates, guard = _run({1: (1.0, 1.0), 2: (10.0, 2.0), 3: (100.0, 3.5)}, settings, versions=2)
    v1 = 2.0 * 0.5 * (1.0 + 10.0)
    # v2: node 1 at t=3 (sent at 2 on v1) and node 2 at t=4 (sent at 2 on v1), both τ=0
    v2 = v1 + 2.0 * 0.5 * (1.0 + 10.0)
    np.testing.assert_allclose(w, [v2, v2], rtol=1e-6)
    assert guard.round_counts[2] == {"ok": 2, "rejected": 0, "failed": 0, "dropped": 2}
    assert updates[1][1] == 4.0


def test_staleness_functions_and_rebase() -> None:
    assert staleness_weight("constant", 7) == 1.0
    assert staleness_weight("polynomial", 3, 0.5) == pytest.approx(0.5)
    assert staleness_weight("polynomial", 1, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="allowed: constant, polynomial"):
        staleness_weight("hinge", 1)
    current = {"w": np.array([1.0, 1.0], dtype=np.float32), "n": np.array(3)}
    start = {"w": np.array([0.0, 0.0], dtype=np.float32), "n": np.array(2)}
    trained = to_array_record({"w": np.array([2.0, 4.0], dtype=np.float32), "n": np.array(5)})
    out = rebase(current, start, trained, 0.5)
    assert out is not None
    values = record_to_numpy(out)
    np.testing.assert_array_equal(values["w"], [2.0, 3.0])  # θ_v + 0.5 (θ_i − θ_{v_i})
    assert values["w"].dtype == np.float32 and int(values["n"]) == 5  # integer arrays: as trained
    assert rebase(current, start, to_array_record({"w": np.zeros(3, dtype=np.float32)}), 1.0) is None


# ------------------------------------------------------------------------------------ real simulations


@pytest.fixture(autouse=True)
def async_engine():  # type: ignore[no-untyped-def]
    with registered("async_local"):
        yield


def _frames(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rounds = pd.read_csv(run / "rounds.csv").drop(columns=["wall_s"])
    clients = pd.read_csv(run / "clients.csv").drop(columns=["compute_s", "compute_cpu_s"])
    return rounds, clients


def test_two_runs_with_the_same_seed_are_identical(tmp_path, capsys):  # type: ignore[no-untyped-def]
    base = [str(QUICK), *TINY, "rounds=3", f"output_dir={tmp_path}", "--quiet"]
    for name in ("a", "b"):
        code, _, err = simulate_cli(capsys, *base, f"run_name={name}")
        assert code == 0, err
    (ra, ca), (rb, cb) = _frames(tmp_path / "a"), _frames(tmp_path / "b")
    pd.testing.assert_frame_equal(ra, rb)
    pd.testing.assert_frame_equal(ca, cb)
    assert list(ra["round"]) == [1, 2, 3] and (ra["clients_ok"] == 2).all()
    assert ra["cum_sim_time_s"].is_monotonic_increasing
    assert ca["arrival_s"].is_monotonic_increasing and (ca["staleness"] >= 0).all()
    assert (ca["staleness"] == ca["round"] - 1 - ca["model_version"]).all()


def test_bad_async_config_exits_2_naming_the_key(tmp_path, capsys):  # type: ignore[no-untyped-def]
    base = [str(QUICK), *TINY, f"output_dir={tmp_path}", "--quiet"]
    for override, key in [
        ("async.concurrency=1", "async.concurrency"),
        ("async.buffer_size=9", "async.buffer_size"),
        ("async.staleness=hinge", "async.staleness"),
        ("async.server_lr=0", "async.server_lr"),
        ("strategy.fraction_evaluate=0.5", "strategy.fraction_evaluate"),
    ]:
        code, _, err = simulate_cli(capsys, *base, override)
        assert code == 2 and err.startswith(f"fedeq: error: {key}:"), err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, capsys):  # type: ignore[no-untyped-def]
    base = [str(QUICK), *TINY, "rounds=4", f"output_dir={tmp_path}", "--quiet"]
    assert simulate_cli(capsys, *base, "run_name=whole")[0] == 0
    SIGNAL_AT.update(
        round=7, signum=signal.SIGTERM
    )  # the call with dispatch index 7  # a call of update 3 or later: at least one update is checkpointed
    code, _, err = simulate_cli(capsys, *base, "run_name=killed")
    killed = tmp_path / "killed"
    done = checkpoint_round(killed)
    assert code == 143 and done is not None and 1 <= done < 4, err
    assert f"interrupted after round {done}" in err.splitlines()[-1]
    code, _, err = simulate_cli(capsys, "--resume", str(killed), "--quiet")
    assert code == 0, err
    (ra, ca), (rb, cb) = _frames(tmp_path / "whole"), _frames(killed)
    pd.testing.assert_frame_equal(ra, rb)
    pd.testing.assert_frame_equal(ca, cb)
