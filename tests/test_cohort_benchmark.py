"""The cohort benchmark (simulations/benchmarks/cohort.py): its smallest mode runs and ends with the line a
script reads; ``--gpu`` refuses clearly without a CUDA device."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simulations" / "benchmarks" / "cohort.py"
FINAL = re.compile(r"speedup_vs_per_client (\S+) speedup_vs_flower (\S+) training_share (\S+)")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}  # the tables' headers on one line
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_numbers_and_final_line_from_a_child_result() -> None:
    """The report's numbers from a child's measurements, by hand: rounds 2.. count, shares and ratios."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from cohort_bench.summary import final_line, numbers, ratio
    finally:
        sys.path.remove(str(SCRIPT.parent))
    result = {
        "round_wall_s": [5.0, 0.4, 0.2, 0.3],
        "clients_ok": [100, 100, 90, 100],
        "train_cpu_s": [9.0, 0.3, 0.2, 0.3],
        "cohorts": [{"round": 2, "calls": 4, "largest": 25}, {"round": 3, "calls": 6, "largest": 25}],
        "cpu": {"wall_s": 1.0, "driver_cpu_s": 0.2, "children_cpu_s": 1.0, "actors_cpu_s": 1.0},
        "cores": 2,
        "actor_peak_rss": [2**20, 3 * 2**20],
        "all_peak_rss": 2**21,
        "driver_peak_rss": 2**21,
        "run_s": 12.0,
    }
    n = numbers("cohorts", result)
    assert n.median_round_s == pytest.approx(0.3)  # median of rounds 2..4, the first is warm-up
    assert n.updates_per_s == pytest.approx(290 / 0.9)
    assert n.training_share == pytest.approx(0.8 / 1.2) and n.actor_share == pytest.approx(0.8)
    assert n.machine_share == pytest.approx(0.4) and n.calls_per_round == 5 and n.largest_call == 25
    line = final_line(ratio(1.2, n.median_round_s), ratio(3.0, n.median_round_s), n.training_share)
    assert (
        FINAL.fullmatch(line)
        and line == "speedup_vs_per_client 4.00 speedup_vs_flower 10.00 training_share 0.67"
    )
    assert math.isnan(ratio(1.0, 0.0))


def test_gpu_mode_without_cuda_says_so() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = _run("--gpu", timeout=120)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr
    assert "speedup" not in out.stdout
