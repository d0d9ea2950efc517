"""The run recorder: per-round appends to ``clients.csv`` give the same file as a whole rewrite."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedeq.results.recorder import CLIENT_COLUMNS, ROUND_COLUMNS, RunRecorder


def _client(rnd: int, i: int, status: str = "ok") -> dict:
    row = {c: float(rnd * 100 + i) + 0.25 for c in CLIENT_COLUMNS}
    row.update(round=rnd, node_id=1_000_000 + i, status=status, reason="" if status == "ok" else "NaN")
    if status != "ok":
        row["residual"] = math.nan
    return row


def _round(rnd: int) -> dict:
    return {**{c: float(rnd) for c in ROUND_COLUMNS}, "round": rnd}


def _record(recorder: RunRecorder, rounds: range, append: bool) -> None:
    for rnd in rounds:
        clients = [_client(rnd, i, "rejected" if (rnd + i) % 4 == 0 else "ok") for i in range(5)]
        recorder.add_round(_round(rnd), clients)
        recorder.write(plots=False, append=append)


def test_appended_clients_csv_equals_a_whole_rewrite(tmp_path):
    appended = RunRecorder(tmp_path / "a", "seed: 0\n")
    whole = RunRecorder(tmp_path / "w", "seed: 0\n")
    _record(appended, range(1, 7), append=True)
    _record(whole, range(1, 7), append=False)
    a = pd.read_csv(tmp_path / "a" / "clients.csv")
    w = pd.read_csv(tmp_path / "w" / "clients.csv")
    assert len(a) == 30 and list(a.columns) == list(CLIENT_COLUMNS)
    pd.testing.assert_frame_equal(a, w)
    assert a["residual"].isna().sum() == w["residual"].isna().sum() > 0
    # the run's final whole write gives the same file, byte for byte
    before = (tmp_path / "w" / "clients.csv").read_bytes()
    appended.write(plots=False)
    assert (tmp_path / "a" / "clients.csv").read_bytes() == before


def test_restored_recorder_rewrites_before_it_appends(tmp_path):
    first = RunRecorder(tmp_path / "run", "seed: 0\n")
    _record(first, range(1, 4), append=True)
    state = first.state()
    # a crash left rows of a round the checkpoint does not know about
    with open(tmp_path / "run" / "clients.csv", "a") as fh:
        fh.write("99,1,2,3\n")
    resumed = RunRecorder(tmp_path / "run", "seed: 0\n")
    resumed.restore(state)
    _record(resumed, range(4, 6), append=True)
    got = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert got["round"].tolist() == [r for r in range(1, 6) for _ in range(5)]


@pytest.mark.parametrize("append", [True, False])
def test_first_write_creates_the_file(tmp_path, append):
    recorder = RunRecorder(tmp_path / "run", "seed: 0\n")
    _record(recorder, range(1, 2), append=append)
    assert len(pd.read_csv(tmp_path / "run" / "clients.csv")) == 5


# ------------------------------------------------------------------------------------ the round callbacks


def test_round_callbacks_write_the_output_folder_after_every_round(tmp_path):
    import io
    import pickle
    import re
    from types import SimpleNamespace

    import numpy as np
    from rich.console import Console

    from fedeq.results.checkpoint import load_checkpoint
    from fedeq.server.callbacks import (
        Checkpointing,
        ConsoleReport,
        ResultsWriter,
        RoundCallback,
        RoundRecords,
    )
    from fedeq.server.loop import run_rounds
    from fedeq.server.round_book import RoundBook
    from strategies import QualityWeightedFedAvg, ReplyGuard
    from tests.flwr_helpers import LocalGrid, task_identity, to_array_record
    from tests.test_strategies import _make_client

    tier = SimpleNamespace(
        name="t", speed=1.0, bandwidth_down_mbps=10.0, bandwidth_up_mbps=10.0, latency_s=0.0
    )
    devices = SimpleNamespace(tiers=[tier, tier], nfe_cost_s=1e-3, deadline_s=None)
    out = tmp_path / "run"
    recorder = RunRecorder(out, "seed: 0\n")
    strategy = ReplyGuard(QualityWeightedFedAvg(quality="residual", min_available_nodes=5))
    initial = to_array_record({"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)})
    book = RoundBook(devices, strategy, initial.count_bytes(), recorder)

    class FakeEvaluation(RoundCallback):
        def after_round(self, server_round, arrays, metrics):  # type: ignore[no-untyped-def]
            w = float(np.abs(arrays["w"].numpy()).mean())
            return {"test_acc": 1.0 / (1.0 + w), "test_loss": w}

    seen: dict[int, tuple[str, str]] = {}

    class Snapshot(RoundCallback):
        def after_round(self, server_round, arrays, metrics):  # type: ignore[no-untyped-def]
            if server_round > 0:
                seen[server_round] = tuple((out / f).read_text() for f in ("rounds.csv", "clients.csv"))

    text = io.StringIO()
    checkpointing = Checkpointing(out, strategy, recorder, book)
    callbacks = [
        FakeEvaluation(),
        RoundRecords(book),
        ResultsWriter(recorder, out),
        Snapshot(),
        ConsoleReport(3, Console(file=text, width=400)),
        checkpointing,
    ]
    grid = LocalGrid({n: _make_client(n) for n in range(1, 6)})
    with task_identity(run_id=grid.run.run_id):
        result = run_rounds(strategy, grid, initial, 3, callbacks=callbacks, overlap=True, timeout=5)

    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "rounds.csv", "clients.csv", "summary.json", "global_model.pt"} <= names
    assert {"checkpoint.pkl", "checkpoint.journal"} <= names
    rounds = pd.read_csv(out / "rounds.csv")
    clients = pd.read_csv(out / "clients.csv")
    assert list(rounds.columns) == list(ROUND_COLUMNS) and list(clients.columns) == list(CLIENT_COLUMNS)
    assert rounds["round"].tolist() == [1, 2, 3] and len(clients) == 3 * 5
    assert rounds["clients_ok"].tolist() == [2, 2, 2] and rounds["clients_rejected"].tolist() == [2, 2, 2]
    assert rounds["clients_failed"].tolist() == [1, 1, 1]
    assert rounds["bytes_up"].tolist() == [2 * initial.count_bytes()] * 3
    ok = clients[clients["status"] == "ok"]
    assert ok["weight"].groupby(clients["round"]).sum().tolist() == pytest.approx([1.0, 1.0, 1.0])
    # after round k the files held exactly the first k rounds of the final files
    for rnd, (rounds_text, clients_text) in seen.items():
        pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(rounds_text)), rounds.iloc[:rnd])
        got = pd.read_csv(io.StringIO(clients_text))
        pd.testing.assert_frame_equal(got, clients.iloc[: len(got)])
        assert got["round"].max() == rnd
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 3
    for rnd, line in enumerate(lines, start=1):
        pattern = (
            rf"round\s+{rnd}/3 acc \d\.\d{{4}} loss \d\.\d{{4}} ok 2 failed 0 rejected 2 sim [\d.]+s wall"
        )
        assert re.match(pattern, line) or "failed 1" in line, line
    state = load_checkpoint(out)
    assert state["round"] == 3 and state["cum_sim"] == pytest.approx(rounds["sim_time_s"].sum())
    np.testing.assert_array_equal(state["arrays"]["w"], result.arrays["w"].numpy())
    assert pickle.loads(state["strategy"])["round_counts"][3] == strategy.round_counts[3]
