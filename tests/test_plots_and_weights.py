"""The run's plots (round 0, titles, tiers, the solver plot, the budget plot) and the ``weight`` column of
``clients.csv`` for every registered strategy and for a strategy that reports its own weights."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedeq.results.plots import MIN_ACC_SPAN, build_figures, load_run, plot_run
from fedeq.results.recorder import RunRecorder
from fedeq.server.callbacks import ResultsWriter, RoundCallback, RoundRecords
from fedeq.server.loop import run_rounds
from fedeq.server.round_book import RoundBook
from strategies import STRATEGIES, ReplyGuard, build_strategy, records_of, weighted_average
from tests.flwr_helpers import LocalGrid, client_metrics, task_identity, to_array_record


@pytest.fixture(autouse=True, scope="module")
def _frozen_gc() -> Iterator[None]:
    """Flower's ``to_numpy_ndarrays(keep_input=False)`` (QFedAvg, Bulyan) runs ``gc.collect()`` per reply,
    ~1 s each with torch loaded; objects alive before the tests need not be scanned."""
    gc.freeze()
    yield
    gc.unfreeze()


# ------------------------------------------------------------------------------------------------ plots

TIERS = {"phone": 2, "laptop": 8}


def _run_folder(path: Path) -> Path:
    """A run folder as ``fedeq simulate`` writes it: 3 rounds, two tiers, the large tier's accuracy equal to
    the global model's, an anytime curve spanning two points of accuracy."""
    path.mkdir()
    acc = [0.5, 0.7, 0.8]
    pd.DataFrame(
        {
            "round": [1, 2, 3],
            "sim_time_s": [1.0, 1.0, 1.0],
            "cum_sim_time_s": [1.0, 2.0, 3.0],
            "test_acc": acc,
            "test_loss": [1.0, 0.8, 0.6],
            "test_acc@phone": [0.4, 0.6, 0.7],
            "test_acc@laptop": acc,
        }
    ).to_csv(path / "rounds.csv", index=False)
    rows = []
    for rnd in (1, 2, 3):
        for node, tier, residual, nfe in (
            (1, "phone", 0.4, 3.0),
            (2, "phone", 0.2, 3.0),
            (3, "laptop", 0.01, 9.0),
        ):
            rows.append(
                {
                    "round": rnd,
                    "node_id": node,
                    "tier": tier,
                    "residual": residual / rnd,
                    "nfe_fwd": nfe,
                    "nfe_bwd": 2.0,
                    "status": "ok",
                }
            )
        rows.append(
            {
                "round": rnd,
                "node_id": 4,
                "tier": "laptop",
                "residual": 9.0,
                "nfe_fwd": 99.0,
                "nfe_bwd": 0.0,
                "status": "rejected",
            }
        )
    pd.DataFrame(rows).to_csv(path / "clients.csv", index=False)
    pd.DataFrame({"budget": [1, 2, 4, 8], "accuracy": [0.79, 0.8, 0.81, 0.8]}).to_csv(
        path / "budget_curve.csv", index=False
    )
    tiers = [{"name": n, "f_max_iter": b, "share": 0.5} for n, b in TIERS.items()]
    (path / "config.yaml").write_text(json.dumps({"run_name": None, "devices": {"tiers": tiers}}))
    initial = {"test_acc": 0.1, "test_loss": 2.3, "test_acc@phone": 0.12, "test_acc@laptop": 0.1}
    (path / "summary.json").write_text(json.dumps({"initial_eval": initial}))
    return path


def test_figures_show_round_0_tiers_solver_stats_and_budgets(tmp_path: Path) -> None:
    run = load_run(_run_folder(tmp_path / "my-run"))
    figs = build_figures(run)
    assert set(figs) == {
        "accuracy.png",
        "accuracy_vs_sim_time.png",
        "solver_per_tier.png",
        "accuracy_vs_budget.png",
    }
    for fig in figs.values():
        assert "my-run" in fig.get_suptitle()

    lines = {line.get_label(): line for line in figs["accuracy.png"].axes[0].get_lines()}
    glob = lines["global model (largest tier budget)"]
    laptop, phone = lines["at laptop's budget"], lines["at phone's budget"]
    assert list(glob.get_xdata()) == [0, 1, 2, 3] and list(glob.get_ydata()) == [0.1, 0.5, 0.7, 0.8]
    assert list(laptop.get_ydata()) == list(glob.get_ydata())  # coincides with the global curve ...
    assert laptop.get_marker() != glob.get_marker() and laptop.get_linestyle() != glob.get_linestyle()
    assert len({glob.get_marker(), laptop.get_marker(), phone.get_marker()}) == 3  # ... and stays visible
    sim = figs["accuracy_vs_sim_time.png"].axes[0].get_lines()[0]
    assert list(sim.get_xdata()) == [0.0, 1.0, 2.0, 3.0]

    residual_ax, nfe_ax = figs["solver_per_tier.png"].axes
    per_tier = {line.get_label(): line for line in residual_ax.get_lines()}
    assert set(per_tier) == set(TIERS)  # one line per tier
    np.testing.assert_allclose(per_tier["phone"].get_ydata(), [0.3, 0.15, 0.1])  # accepted calls only
    np.testing.assert_allclose(per_tier["laptop"].get_ydata(), [0.01, 0.005, 0.01 / 3])
    nfe = {
        line.get_label(): list(line.get_ydata()) for line in nfe_ax.get_lines() if line.get_label() in TIERS
    }
    assert nfe == {"phone": [3.0] * 3, "laptop": [9.0] * 3}

    ax = figs["accuracy_vs_budget.png"].axes[0]
    vertical = {
        line.get_label(): line.get_xdata()
        for line in ax.get_lines()
        if line.get_label() != "final global model"
    }
    assert {label.split(" ")[0]: x[0] for label, x in vertical.items()} == TIERS
    assert all(x[0] == x[1] for x in vertical.values())
    assert {t.get_text().strip() for t in ax.texts} == set(TIERS)
    low, high = ax.get_ylim()
    assert high - low >= MIN_ACC_SPAN and 0.0 <= low <= 0.79 and 0.81 <= high <= 1.0

    written = plot_run(tmp_path / "my-run")
    assert sorted(p.name for p in written) == sorted(figs) and all(p.stat().st_size > 0 for p in written)


# ------------------------------------------------------------------------------------ weights

NODES = (1, 2, 3, 4)
EXAMPLES = {1: 10, 2: 30, 3: 20, 4: 40}
LOSS = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
RESIDUAL = {1: 0.1, 2: 0.5, 3: 1.2, 4: 0.3}
BUDGET = {1: 2.0, 2: 6.0, 3: 12.0, 4: 30.0}
STEPS = {1: 1, 2: 3, 3: 2, 4: 4}
VALUE = {1: 0.0, 2: 0.1, 3: 0.25, 4: 5.0}  # node 2 is Krum's choice, then node 1; node 4 an outlier
BAD = 5  # replies with NaN arrays: rejected


def _client(node: int):  # type: ignore[no-untyped-def]
    def client(msg: Message) -> RecordDict:
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        value = float("nan") if node == BAD else VALUE[node]
        new = {k: np.full_like(v, value) for k, v in arrays.items()}
        metrics = client_metrics(
            num_examples=EXAMPLES.get(node, 10),
            train_loss=LOSS.get(node, 1.0),
            fp_residual=RESIDUAL.get(node, 0.1),
            budget=BUDGET.get(node, 2.0),
            local_steps=STEPS.get(node, 1),
            tier=0,
        )
        return RecordDict({"arrays": to_array_record(new), "metrics": MetricRecord(metrics)})

    return client


def _share(raw: Mapping[int, float]) -> dict[int, float]:
    total = sum(raw.values())
    return {n: raw.get(n, 0.0) / total for n in NODES}


BY_EXAMPLES = _share(EXAMPLES)
EQUAL = _share(dict.fromkeys(NODES, 1.0))
HAND: dict[str, tuple[dict[str, Any], dict[int, float]]] = {
    "fedavg": ({}, BY_EXAMPLES),
    "fedprox": ({"proximal_mu": 0.1}, BY_EXAMPLES),
    "fedadam": ({}, BY_EXAMPLES),
    "fedyogi": ({}, BY_EXAMPLES),
    "fedadagrad": ({}, BY_EXAMPLES),
    "fedavgm": ({"server_momentum": 0.9}, BY_EXAMPLES),
    "quality": ({"quality": "residual"}, _share({n: EXAMPLES[n] * np.exp(-RESIDUAL[n]) for n in NODES})),
    "fedmedian": ({}, EQUAL),
    "fedtrimmedavg": ({"beta": 0.25}, EQUAL),
    "krum": ({}, _share({2: 1.0})),
    "multikrum": ({"num_nodes_to_select": 2}, _share({1: EXAMPLES[1], 2: EXAMPLES[2]})),
    "bulyan": ({}, EQUAL),  # f = 0: every reply selected, then an unweighted coordinate-wise mean
    "qfedavg": ({"q": 0.5, "client_learning_rate": 0.1}, _share({n: LOSS[n] ** 0.5 for n in NODES})),
    # c_i = p_i τ_eff / τ_i with τ_i the local steps: normalised, ∝ n_i / τ_i
    "fednova": ({"work": "steps"}, _share({n: EXAMPLES[n] / STEPS[n] for n in NODES})),
}


def _one_round(strategy: ReplyGuard, out: Path, write: bool = False) -> pd.DataFrame:
    """One round on a fake grid of 5 nodes, recorded by the round book (and the output folder written, with
    ``write``); the round's ``clients.csv`` rows."""
    tier = SimpleNamespace(
        name="t", speed=1.0, bandwidth_down_mbps=10.0, bandwidth_up_mbps=10.0, latency_s=0.0
    )
    devices = SimpleNamespace(tiers=[tier], nfe_cost_s=1e-3, deadline_s=None)
    recorder = RunRecorder(out, "seed: 0\n")
    initial = to_array_record({"w": np.full((3,), 0.5, np.float32)})
    book = RoundBook(devices, strategy, initial.count_bytes(), recorder)

    class Evaluation(RoundCallback):
        def after_round(self, server_round, arrays, metrics):  # type: ignore[no-untyped-def]
            return {"test_acc": 0.2 + 0.1 * server_round, "test_loss": 1.0, "test_acc@t": 0.3}

    callbacks: list[RoundCallback] = [Evaluation(), RoundRecords(book)]
    if write:
        callbacks.append(ResultsWriter(recorder, out))
    grid = LocalGrid({n: _client(n) for n in (*NODES, BAD)})
    with task_identity(run_id=grid.run.run_id):
        run_rounds(strategy, grid, initial, 1, callbacks=callbacks, timeout=5)
    return recorder.clients_frame()


def test_every_registered_strategy_has_a_hand_computed_case() -> None:
    assert set(HAND) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_weight_column_is_the_normalised_aggregation_weight(name: str, tmp_path: Path) -> None:
    kwargs, expected = HAND[name]
    strategy = build_strategy(name, kwargs, fraction_train=1.0, min_train_nodes=5, min_available_nodes=5)
    rows = _one_round(strategy, tmp_path / "run")
    ok = rows[rows["status"] == "ok"]
    assert sorted(ok["node_id"]) == list(NODES)
    assert rows.loc[rows["node_id"] == BAD, "weight"].tolist() == [0.0]  # rejected: not averaged
    assert float(ok["weight"].sum()) == pytest.approx(1.0)
    assert dict(zip(ok["node_id"], ok["weight"], strict=True)) == pytest.approx(expected)


class BudgetWeighted(FedAvg):
    """Averages the replies in proportion to the forward budget they report, and says so."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.weights = {
            int(m.metadata.src_node_id): float(records_of(m.content, MetricRecord)[0]["budget"])
            for m in replies
        }
        arrays = weighted_average(
            [records_of(m.content, ArrayRecord)[0] for m in replies], list(self.weights.values())
        )
        return arrays, MetricRecord({})

    def aggregation_weights(self, server_round: int, replies: Sequence[Message]) -> Mapping[int, float]:
        return self.weights


def test_a_custom_strategy_reports_its_weights_through_the_hook(tmp_path: Path) -> None:
    strategy = build_strategy(
        "tests.test_plots_and_weights:BudgetWeighted",
        {},
        fraction_train=1.0,
        min_train_nodes=5,
        min_available_nodes=5,
    )
    rows = _one_round(strategy, tmp_path / "run")
    ok = rows[rows["status"] == "ok"]
    assert dict(zip(ok["node_id"], ok["weight"], strict=True)) == pytest.approx(_share(BUDGET))


def test_the_end_of_a_run_plots_from_round_0(tmp_path: Path) -> None:
    strategy = build_strategy("fedavg", {}, fraction_train=1.0, min_train_nodes=5, min_available_nodes=5)
    _one_round(strategy, tmp_path / "run", write=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["initial_eval"] == {"test_acc": 0.2, "test_loss": 1.0, "test_acc@t": 0.3}
    assert load_run(tmp_path / "run").rounds["round"].tolist() == [0, 1]
    assert {"accuracy.png", "accuracy_vs_sim_time.png", "solver_per_tier.png"} <= {
        p.name for p in (tmp_path / "run").glob("*.png")
    }


def test_a_wrapper_reports_the_weights_of_the_strategy_it_wraps(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    inner = FedAvg(fraction_train=1.0, min_train_nodes=5, min_available_nodes=5)
    dp = DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=0.0, clipping_norm=100.0, num_sampled_clients=5
    )
    rows = _one_round(ReplyGuard(dp), tmp_path / "run")
    ok = rows[rows["status"] == "ok"]
    assert dict(zip(ok["node_id"], ok["weight"], strict=True)) == pytest.approx(BY_EXAMPLES)
