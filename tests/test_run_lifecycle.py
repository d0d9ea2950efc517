"""The life of a `fedeq simulate` run: its folder is never overwritten, `--resume DIR rounds=N` extends it
exactly, a run without any accepted update fails, every run ends with a summary, a signal stops it cleanly.

Most tests run the command in this process on an in-process engine (the real ServerApp and ClientApp over a
local grid, resumable like engine=ray); the signal test runs engine=ray in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from flwr.app import RecordDict

from fedeq.config import load_config
from fedeq.engines.stoppable import RunStopped, StoppableGrid
from fedeq.results.checkpoint import checkpoint_round
from fedeq.results.recorder import claim_run_dir, run_dir
from fedeq.results.run_report import read_report
from tests.flwr_helpers import LocalGrid, make_instruction
from tests.inprocess_engine import SIGNAL_AT, registered, simulate_cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
TINY = [
    "engine=lifecycle_local", "num_clients=4", "clients_per_round=4", "eval.budgets=[1]", "model.hidden=16",
    "train.batch_size=128", "devices.tiers.1.solver=fixed_point", "devices.tiers.1.backward=jfb",
    "devices.tiers.1.f_max_iter=3", "devices.tiers.1.b_max_iter=2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def local_engine():  # type: ignore[no-untyped-def]
    with registered("lifecycle_local"):
        yield


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("fedeq: error:")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_failed_run_exits_1_and_its_folder_is_never_overwritten(tmp_path, capsys):
    base = [str(QUICK), *TINY, "rounds=2", "faults.raise_p=1", f"output_dir={tmp_path}", "--quiet"]
    code, out, err = simulate_cli(capsys, *base, "run_name=r")
    run = tmp_path / "r"
    assert code == 1
    assert _error_lines(err) == [
        "fedeq: error: no client update was accepted in any of the 2 round(s) (8 calls: 8 failed); most "
        "frequent reason (failed, 8 of 8): error reply (code 2): InjectedFault: injected fault: client raised"
    ]
    assert re.search(r"rounds without update\s+1, 2", out) and re.search(
        r"client calls\s+ok 0, failed 8", out
    )
    assert f"results written to {run}" in out
    before = _files(run)

    # the same run_name, or the run's own config.yaml (which carries it): exit 2 before any work
    saved = run / "config.yaml"
    for args in (base + ["run_name=r"], [str(saved), "--quiet"]):
        code, out, err = simulate_cli(capsys, *args)
        assert code == 2 and out == ""
        assert err.splitlines() == _error_lines(err) and len(_error_lines(err)) == 1, err
        assert err.startswith(f"fedeq: error: run_name: {run} already holds a run")
        assert f"fedeq simulate --resume {run}" in err and "--overwrite" in err
        assert _files(run) == before

    # --overwrite replaces the folder's contents, only once the config is valid
    code, _, err = simulate_cli(capsys, *base, "run_name=r", "--overwrite", "rounds=abc")
    assert code == 2 and "rounds" in err and _files(run) == before
    (run / "notes.txt").write_text("an earlier file")
    code, _, _ = simulate_cli(capsys, *base, "run_name=r", "seed=1", "--overwrite")
    assert code == 1 and not (run / "notes.txt").exists()
    assert load_config(saved).seed == 1 and (run / "summary.json").read_bytes() != before["summary.json"]
    # --overwrite never deletes a folder that is not a fedeq run (a mistyped output_dir / run_name)
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "keep.txt").write_text("important")
    code, _, err = simulate_cli(capsys, *base, "run_name=notes", "--overwrite")
    assert code == 2 and err.startswith(f"fedeq: error: --overwrite: {notes} is not a fedeq run folder"), err
    assert (notes / "keep.txt").read_text() == "important" and (notes / "sub").is_dir()

    code, _, err = simulate_cli(capsys, "--resume", str(run), "--overwrite")
    assert code == 2 and err.startswith("fedeq: error: --overwrite: cannot be combined with --resume")

    # without a run_name every run gets a folder of its own, also when started in the same second
    first = claim_run_dir(run_dir(tmp_path / "auto", None))
    assert claim_run_dir(run_dir(tmp_path / "auto", None)) != first


def test_sigterm_and_resume_extend_a_run_to_the_numbers_of_a_longer_one(tmp_path, capsys):
    base = [str(QUICK), *TINY, f"output_dir={tmp_path}", "--quiet"]
    short, long = tmp_path / "short", tmp_path / "long"

    # SIGTERM in round 2: the run stops after round 1's checkpoint, says how to go on, and continues
    handler = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier Ray run in this process left
    SIGNAL_AT.update(round=2, signum=signal.SIGTERM)
    code, out, err = simulate_cli(capsys, *base, "rounds=2", "run_name=long")
    assert code == 143 and out == ""
    assert err.splitlines()[-1] == f"interrupted after round 1; continue with fedeq simulate --resume {long}"
    assert checkpoint_round(long) == 1 and signal.getsignal(signal.SIGTERM) is handler
    code, out, err = simulate_cli(capsys, "--resume", str(long), "--quiet")
    assert code == 0 and re.search(r"rounds\s+2 of 2", out), err

    # a finished 1-round run extended to 2 rounds: the numbers of the run configured with 2 rounds
    assert simulate_cli(capsys, *base, "rounds=1", "run_name=short")[0] == 0
    code, out, err = simulate_cli(capsys, "--resume", str(short), "rounds=2", "--quiet")
    assert code == 0, err
    assert load_config(short / "config.yaml").rounds == 2 and checkpoint_round(short) == 2
    a, b = torch.load(long / "global_model.pt"), torch.load(short / "global_model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timings = ["wall_s"]
    pd.testing.assert_frame_equal(
        pd.read_csv(long / "rounds.csv").drop(columns=timings),
        pd.read_csv(short / "rounds.csv").drop(columns=timings),
    )
    timings = ["compute_s", "compute_cpu_s"]
    pd.testing.assert_frame_equal(
        pd.read_csv(long / "clients.csv").drop(columns=timings),
        pd.read_csv(short / "clients.csv").drop(columns=timings),
    )
    # the closing summary is built from the run's records: right after a resume too
    report = read_report(long)
    assert re.search(r"rounds\s+2 of 2", out) and f"results written to {short}" in out
    assert f"best {report.best_test_acc:.4f} (round {report.best_round})" in out
    assert re.search(r"client calls\s+ok 8, failed 0, rejected 0, offline 0, dropped 0", out), out

    # fewer rounds than done, another changed key, or a config file: exit 2 naming it, nothing changed
    before = _files(short)
    for args, start in [
        (["rounds=1"], "rounds: the run in"),
        (["rounds=3", "seed=5"], "seed: cannot be changed when a run is resumed"),
        (["devices.tiers.0.f_max_iter=3"], "devices.tiers[0].f_max_iter: cannot be changed"),
        ([str(QUICK)], "--resume: takes no config file"),
    ]:
        code, out, err = simulate_cli(capsys, "--resume", str(short), *args)
        assert code == 2 and err.startswith(f"fedeq: error: {start}"), err
        assert len(err.splitlines()) == 1 and _files(short) == before
    assert "allowed: an integer >= 2 (got 1)" in simulate_cli(capsys, "--resume", str(short), "rounds=1")[2]


def test_the_report_names_the_rounds_without_update_and_the_top_reason(tmp_path):
    rounds = pd.DataFrame(
        {"round": [1, 2, 3], "wall_s": [1.0, 1.0, 2.0], "sim_time_s": [3.0, 0.0, 4.0],
         "test_acc": [0.5, 0.4, 0.45], "bytes_up": [10, 0, 20], "bytes_down": [30, 30, 30],
         "clients_ok": [1, 0, 2], "clients_failed": [0, 0, 0], "clients_rejected": [0, 1, 0],
         "clients_offline": [2, 2, 1], "clients_dropped": [0, 0, 0]}
    )  # fmt: skip
    rounds.to_csv(tmp_path / "rounds.csv", index=False)
    offline = [f"offline: partition {p} (small, availability 0.5) not reachable" for p in (0, 1, 2, 3, 1)]
    statuses = ["ok", "offline", "offline", "rejected", "offline", "offline", "ok", "ok", "offline"]
    reasons = ["", offline[0], offline[1], "non-finite arrays", offline[2], offline[3], "", "", offline[4]]
    pd.DataFrame({"status": statuses, "reason": reasons}).to_csv(tmp_path / "clients.csv", index=False)
    report = read_report(tmp_path)
    assert report.empty_rounds == (2,) and report.best_round == 1 and report.final_test_acc == 0.45
    assert report.top_reason == ("offline", offline[0], 5) and report.failure() is None
    assert report.calls == {"ok": 3, "failed": 0, "rejected": 1, "offline": 5, "dropped": 0}


def test_a_stopped_run_stops_waiting_for_replies():
    """engine=flower runs the ServerApp in a thread of its own: once the run is stopped (Ctrl-C in the main
    thread) it must not wait for replies that will not come."""

    class Silent(LocalGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            return []

    stop = threading.Event()
    answers = StoppableGrid(LocalGrid({1: lambda m: RecordDict()}), stop)
    replies = answers.send_and_receive([make_instruction(dst_node_id=1)], timeout=60)
    assert [r.metadata.src_node_id for r in replies] == [1]
    silent = StoppableGrid(Silent({1: lambda m: RecordDict()}), stop)
    assert silent.send_and_receive([make_instruction(dst_node_id=1)], timeout=0.0) == []
    stop.set()
    with pytest.raises(RunStopped):
        silent.send_and_receive([make_instruction(dst_node_id=1)], timeout=None)


def _alive(procs: list[Any]) -> list[Any]:
    """The processes of ``procs`` still running after a grace period for their exit."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=15)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_ctrl_c_stops_ray_cleanly_and_the_run_resumes(tmp_path, capsys):
    import psutil

    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "fedeq.cli.main", "simulate", str(QUICK), "engine=ray", "rounds=30"]
    cmd += ["num_clients=4", "eval.budgets=[1]", f"output_dir={tmp_path}", "run_name=r"]
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}  # Ray's socket paths must stay short
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("round   1/30"):
                break
        children = psutil.Process(proc.pid).children(recursive=True)  # gcs, raylet, workers, actors
        proc.send_signal(signal.SIGINT)
        output = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    k = checkpoint_round(run)
    assert k is not None and output.splitlines()[-1] == (
        f"interrupted after round {k}; continue with fedeq simulate --resume {run}"
    )
    assert "Traceback" not in output
    assert children and not _alive(children)

    code, out, err = simulate_cli(capsys, "--resume", str(run), f"rounds={k + 1}", "--quiet")
    assert code == 0, err[-3000:]
    assert (
        re.search(rf"rounds\s+{k + 1} of {k + 1}", out) and load_config(run / "config.yaml").rounds == k + 1
    )


STRAY_THREAD = """
import sys, threading
import fedeq.cli.main as cli
threading.Thread(target=threading.Event().wait).start()  # a non-daemon thread blocked for good
cli.main = lambda argv=None: {code}
sys.exit(cli.run_command(grace_s=0.2))
"""


@pytest.mark.parametrize("code", [130, 143])
def test_an_interrupted_command_exits_despite_a_blocked_thread(code: int) -> None:
    """After a signal, the ``fedeq`` executable exits with its status even when a library left a non-daemon
    thread blocked (the interpreter would otherwise wait for it forever)."""
    proc = subprocess.run(
        [sys.executable, "-c", STRAY_THREAD.format(code=code)], cwd=ROOT, timeout=60, capture_output=True
    )
    assert proc.returncode == code, proc.stderr[-2000:]


def test_stray_threads_are_the_live_non_daemon_ones() -> None:
    from fedeq.cli.main import stray_threads

    earlier = set(stray_threads(0.0))  # threads earlier tests in this process left, if any
    release = threading.Event()
    blocked = threading.Thread(target=release.wait)
    done = threading.Thread(target=lambda: None)
    daemon = threading.Thread(target=release.wait, daemon=True)
    for t in (blocked, done, daemon):
        t.start()
    try:
        assert [t for t in stray_threads(0.2) if t not in earlier] == [blocked]
    finally:
        release.set()
        blocked.join()
    assert [t for t in stray_threads(0.2) if t not in earlier] == []
