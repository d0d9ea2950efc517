"""Cohorts on the Ray engine: a run with cohorts gives the run of one client per call, and cohorts form."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedeq.config import load_config

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

SAME = ["num_examples", "nfe_fwd", "nfe_bwd", "status", "tier", "partition", "sim_time_s"]
CLOSE = ["weight", "residual", "train_loss", "val_loss"]


def _run(tmp_path: Path, name: str, *overrides: str) -> Path:
    from fedeq.engines.simulate import simulate

    cfg = load_config(
        QUICK,
        [
            "engine=ray",
            f"output_dir={tmp_path}",
            f"run_name={name}",
            "num_clients=12",
            "clients_per_round=12",
            "rounds=2",
            "ray.actors_per_tier=2",
            *overrides,
        ],
    )
    return simulate(cfg, quiet=True)


def test_cohorts_give_the_per_client_run_and_form_per_actor(tmp_path: Path) -> None:
    alone = _run(tmp_path, "alone", "ray.cohort_size=1")
    together = _run(tmp_path, "together", "ray.cohort_size=auto")
    a, b = (pd.read_csv(p / "clients.csv").sort_values(["round", "partition"]) for p in (alone, together))
    pd.testing.assert_frame_equal(a[SAME].reset_index(drop=True), b[SAME].reset_index(drop=True))
    for col in CLOSE:  # float32 training: the same up to rounding
        assert (a[col].to_numpy() - b[col].to_numpy()).__abs__().max() < 1e-4, col
    ra, rb = (pd.read_csv(p / "rounds.csv") for p in (alone, together))
    assert (ra.test_acc - rb.test_acc).abs().max() <= 1.5 / 360  # at most one test example flips
    # 6 clients per tier and round over 2 actors: two cohorts of 3, whose clients share the cohort's time
    per_call = b.groupby(["round", "tier"]).compute_s.nunique()
    assert (per_call == 2).all(), per_call
    assert (a.groupby(["round", "tier"]).compute_s.nunique() == 6).all()
