"""Checkpoint journal: flat per-round cost, exact resume, crash leftovers dropped, mismatches refused."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict

import clients.client_app as client_app
from fedeq.config import load_config
from fedeq.engines.ray.grid import NODE_ID_OFFSET
from fedeq.results.checkpoint import CHECKPOINT_FILE, JOURNAL_FILE, Journal, load_checkpoint
from fedeq.server.app import run_server
from tests.flwr_helpers import LocalGrid, task_identity

QUICK = "simulations/configs/quick.yaml"


# ------------------------------------------------------------------------------------ the journal alone


def _fill(journal: Journal, lists: dict[str, list], rounds: range) -> None:
    for rnd in rounds:
        lists["a"].extend([(rnd, i) for i in range(rnd)])  # a list that grows by a different amount a round
        lists["b"].append({"round": rnd})
        journal.append(rnd, journal.take(lists))


def test_journal_rebuilds_the_lists_of_a_round_and_drops_later_records(tmp_path):
    journal = Journal(tmp_path)
    lists: dict[str, list] = {"a": [], "b": []}
    _fill(journal, lists, range(1, 4))
    lengths_at_3 = {k: len(v) for k, v in lists.items()}
    _fill(journal, lists, range(4, 6))  # written after the checkpoint of round 3 (a crash before round 4's)

    loaded = Journal(tmp_path)
    got = loaded.load(3, lengths_at_3)
    assert got == {"a": lists["a"][: lengths_at_3["a"]], "b": lists["b"][:3]}
    assert loaded.lengths == lengths_at_3
    # the records of rounds 4 and 5 are gone from the file: appending goes on from round 3
    lists = {k: list(v) for k, v in got.items()}
    _fill(loaded, lists, range(4, 5))
    assert Journal(tmp_path).load(4, {k: len(v) for k, v in lists.items()}) == lists


def test_journal_ignores_a_record_cut_short(tmp_path):
    journal = Journal(tmp_path)
    lists: dict[str, list] = {"a": [], "b": []}
    _fill(journal, lists, range(1, 3))
    lengths = {k: len(v) for k, v in lists.items()}
    complete = (tmp_path / JOURNAL_FILE).stat().st_size
    record = pickle.dumps((3, {"a": [1, 2, 3], "b": []}), protocol=pickle.HIGHEST_PROTOCOL)
    with open(tmp_path / JOURNAL_FILE, "ab") as fh:
        fh.write(record[: len(record) // 2])
    assert Journal(tmp_path).load(2, lengths) == lists
    assert (tmp_path / JOURNAL_FILE).stat().st_size == complete  # the cut record was truncated away


def test_journal_that_does_not_match_the_checkpoint_is_refused(tmp_path):
    journal = Journal(tmp_path)
    lists: dict[str, list] = {"a": [], "b": []}
    _fill(journal, lists, range(1, 3))
    with pytest.raises(ValueError, match=r"checkpoint.journal does not match checkpoint.pkl \(round 4\)"):
        Journal(tmp_path).load(4, {"a": 10, "b": 4})


def test_a_list_that_shrinks_is_an_error(tmp_path):
    journal = Journal(tmp_path)
    journal.take({"a": [1, 2, 3]})
    with pytest.raises(RuntimeError, match="journaled list 'a' shrank from 3 to 1 items"):
        journal.take({"a": [1]})


# ------------------------------------------------------------------------------------ a whole server run


def _grid(num_clients: int) -> LocalGrid:
    def node(pid: int):  # type: ignore[no-untyped-def]
        def run(message: Message) -> Message:
            config = {"partition-id": pid, "num-partitions": num_clients}
            context = Context(
                run_id=1, node_id=NODE_ID_OFFSET + pid, node_config=config, state=RecordDict(), run_config={}
            )
            return client_app.app(message, context)

        return run

    return LocalGrid({NODE_ID_OFFSET + pid: node(pid) for pid in range(num_clients)})


def _run(tmp_path, name: str, rounds: int, resume: bool = False):  # type: ignore[no-untyped-def]
    overrides = [f"rounds={rounds}", "num_clients=4", "clients_per_round=4", "eval.budgets=[1,2]"]
    cfg = load_config(QUICK, overrides)
    grid = _grid(cfg.num_clients)
    with task_identity(run_id=grid.run.run_id):
        return run_server(grid, cfg, out_dir=tmp_path / name, quiet=True, resume=resume)


def _checkpoint_sizes(out) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return (out / CHECKPOINT_FILE).stat().st_size, (out / JOURNAL_FILE).stat().st_size


def test_checkpoint_stays_flat_and_resume_is_exact(tmp_path):
    full = _run(tmp_path, "full", rounds=6)
    short = _run(tmp_path, "short", rounds=2)
    (ckpt_full, journal_full), (ckpt_short, journal_short) = _checkpoint_sizes(full), _checkpoint_sizes(short)
    # checkpoint.pkl holds no per-round lists: 4 more rounds add only their counters (~100 B a round), while
    # the journal grows with every reply
    assert ckpt_full - ckpt_short < 1000 < journal_full - journal_short
    state = load_checkpoint(full)
    assert state["round"] == 6 and len(state["journal"]["recorder.clients"]) == 6 * 4
    assert len(state["journal"]["strategy.client_log"]) == 6 * 4

    # resume the 2-round run up to 6 rounds, after leaving what a crash could leave behind: a journal record
    # the checkpoint does not know about, cut short
    record = pickle.dumps((3, {"strategy.client_log": [{"round": 3}]}), protocol=pickle.HIGHEST_PROTOCOL)
    with open(short / JOURNAL_FILE, "ab") as fh:
        fh.write(record[:-5])
    resumed = _run(tmp_path, "short", rounds=6, resume=True)
    a, b = torch.load(full / "global_model.pt"), torch.load(resumed / "global_model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timings = ["wall_s"]
    pd.testing.assert_frame_equal(
        pd.read_csv(full / "rounds.csv").drop(columns=timings),
        pd.read_csv(resumed / "rounds.csv").drop(columns=timings),
    )
    timings = ["compute_s", "compute_cpu_s"]
    pd.testing.assert_frame_equal(
        pd.read_csv(full / "clients.csv").drop(columns=timings),
        pd.read_csv(resumed / "clients.csv").drop(columns=timings),
    )
    assert _checkpoint_sizes(resumed)[1] == journal_full


def test_a_checkpoint_without_journal_still_resumes(tmp_path):
    """Checkpoints written before the journal kept every list in checkpoint.pkl."""
    full = _run(tmp_path, "full", rounds=4)
    out = _run(tmp_path, "old", rounds=2)
    state = load_checkpoint(out)
    lists = state.pop("journal")
    snapshot = pickle.loads(state["strategy"])
    for attr in ("client_log", "eval_client_log"):
        snapshot[attr] = lists[f"strategy.{attr}"]
    state["strategy"] = pickle.dumps(snapshot)
    state["recorder"].update(rounds=lists["recorder.rounds"], clients=lists["recorder.clients"])
    (out / CHECKPOINT_FILE).write_bytes(pickle.dumps(state))
    (out / JOURNAL_FILE).unlink()
    resumed = _run(tmp_path, "old", rounds=4, resume=True)
    a, b = torch.load(full / "global_model.pt"), torch.load(resumed / "global_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(load_checkpoint(resumed)["journal"]["recorder.clients"]) == 4 * 4


def _damage_garbage(out) -> None:  # type: ignore[no-untyped-def]
    (out / CHECKPOINT_FILE).write_bytes(b"not a pickle")


def _damage_keys(out) -> None:  # type: ignore[no-untyped-def]
    (out / CHECKPOINT_FILE).write_bytes(pickle.dumps({"round": 2}))


def _damage_journal(out) -> None:  # type: ignore[no-untyped-def]
    data = (out / JOURNAL_FILE).read_bytes()
    (out / JOURNAL_FILE).write_bytes(data[: len(data) // 3])  # round 2's record (at least) is lost


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_damage_garbage, "is not a readable checkpoint"),
        (_damage_keys, "is not a fedeq checkpoint (missing ['arrays', 'cum_sim', 'recorder', 'rng', "),
        (_damage_journal, "checkpoint.journal does not match checkpoint.pkl (round 2)"),
    ],
)
def test_resume_of_a_damaged_checkpoint_exits_2_and_changes_nothing(tmp_path, damage, problem):
    out = _run(tmp_path, "run", rounds=2)
    damage(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = subprocess.run(
        [sys.executable, "-m", "fedeq.cli.main", "simulate", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedeq: error: --resume: "), res.stderr
    assert problem in lines[0] and "allowed: checkpoint.pkl and checkpoint.journal" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------ wrapped strategies


def test_wrapped_strategy_state_is_nested_and_restored_in_place():
    from flwr.serverapp.strategy import FedAdam

    from fedeq.results.checkpoint import restore_strategy, snapshot_strategy, strategy_state
    from strategies import ReplyGuard

    def guard() -> ReplyGuard:
        return ReplyGuard(FedAdam(eta=0.5))

    saved = guard()
    saved.round_counts[1] = {"ok": 2, "rejected": 0, "failed": 0}
    saved.client_log.append({"round": 1})
    saved.reply_checks.append(lambda metrics: None)
    saved.strategy.current_arrays = {"w": [1.0, 2.0]}  # what FedAdam keeps between rounds
    state = strategy_state(saved)
    assert "client_log" not in state and "reply_checks" not in state  # journaled / transient
    assert state["strategy"]["current_arrays"] == {"w": [1.0, 2.0]} and state["strategy"]["eta"] == 0.5

    fresh = guard()
    inner = fresh.strategy
    restore_strategy(fresh, snapshot_strategy(saved))
    assert fresh.strategy is inner  # restored in place: whoever holds the inner strategy sees the state
    assert inner.current_arrays == {"w": [1.0, 2.0]}
    assert fresh.round_counts == {1: {"ok": 2, "rejected": 0, "failed": 0}}

    # a snapshot of the strategy class the guard used to be mixed into: one flat dict
    flat = {**vars(saved.strategy), "round_counts": {3: {"ok": 1}}, "global_layout": None}
    flat["current_arrays"] = {"w": [3.0]}
    old = guard()
    restore_strategy(old, pickle.dumps(flat))
    assert old.strategy.current_arrays == {"w": [3.0]} and old.round_counts == {3: {"ok": 1}}
    assert "current_arrays" not in vars(old)
