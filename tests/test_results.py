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
