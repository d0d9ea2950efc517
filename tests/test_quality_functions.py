"""The quality functions server_val, agreement and nfe, the context they read, the server's validation
split and the bound configs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedeq.config import ConfigError, default_config, load_config
from fedeq.data import client_partitions, load_client_data, server_validation
from fedeq.models import build_model
from fedeq.registry import QUALITY
from fedeq.server.app import attach_server_evaluator, strategy_for
from fedeq.train import evaluate
from strategies import QualityContext, QualityWeightedFedAvg, ReplyGuard, quality_function, register_quality
from strategies.server_eval import ServerEvaluator
from tests.flwr_helpers import LocalGrid, client_metrics, make_reply, task_identity, to_array_record

CONFIGS = Path(__file__).resolve().parents[1] / "simulations" / "configs"
GLOBAL = {"w": np.zeros(3, np.float32), "c": np.asarray(1, np.int64)}
DELTAS = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, -1.0, 0.0]]
N = np.array([10.0, 20.0, 30.0, 40.0])


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _replies(**per_reply: list[float]) -> list[Message]:
    out = []
    for i, delta in enumerate(DELTAS):
        extra = {k: v[i] for k, v in per_reply.items()}
        arrays = {"w": np.array(delta, np.float32), "c": np.asarray(2, np.int64)}
        out.append(make_reply(i + 1, arrays, client_metrics(num_examples=int(N[i]), **extra)))
    return out


def _configured(strategy: QualityWeightedFedAvg) -> ReplyGuard:
    guard = ReplyGuard(strategy)
    grid = LocalGrid({i + 1: (lambda m: m.content) for i in range(4)})
    guard.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid)
    return guard


def _hand_w(weights: np.ndarray) -> np.ndarray:
    return (weights[:, None] * np.array(DELTAS)).sum(axis=0) / weights.sum()


def test_agreement_matches_hand_computation() -> None:
    # median of Δ = [1, 1, 0]; cos = [1/√2, 1, 1/2, -1 -> 0]
    q = np.array([1 / math.sqrt(2), 1.0, 0.5, 0.0])
    guard = _configured(QualityWeightedFedAvg(quality="agreement", fraction_train=1.0, min_available_nodes=4))
    arrays, metrics = guard.aggregate_train(1, _replies())
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), _hand_w(N * q), rtol=1e-6)
    assert guard.strategy.last_quality == pytest.approx({i + 1: float(v) for i, v in enumerate(q)})
    assert guard.strategy.round_arrays is None  # not kept past the round


def test_nfe_matches_hand_computation() -> None:
    steps, fwd, bwd = [4.0, 2.0, 1.0, 8.0], [3.0, 9.0, 2.0, 1.0], [1.0, 1.0, 0.0, 0.0]
    work = np.array([16.0, 20.0, 2.0, 8.0])  # steps * (fwd + bwd)
    ctx = QualityContext(
        1,
        1.0,
        tuple(
            {"local-steps": s, "nfe-fwd": f, "nfe-bwd": b} for s, f, b in zip(steps, fwd, bwd, strict=True)
        ),
    )
    got = [quality_function("nfe")(m, ctx) for m in ctx.round_metrics]
    assert got == pytest.approx((work / 20.0).tolist())
    guard = ReplyGuard(QualityWeightedFedAvg(quality="nfe"))
    arrays, _ = guard.aggregate_train(1, _replies(local_steps=steps, nfe_fwd=fwd, nfe_bwd=bwd))
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), _hand_w(N * work / 20.0), rtol=1e-6)
    assert {"local-steps", "nfe-fwd", "nfe-bwd"} <= set(guard.required_keys(train=True))


def test_server_val_matches_hand_computation() -> None:
    tau = 0.5

    def loss(arrays: ArrayRecord) -> float:  # a stand-in server loss: ℓ = Σ θ_w
        return float(arrays["w"].numpy().sum())

    strategy = QualityWeightedFedAvg(quality="server_val", temperature=tau, min_available_nodes=4)
    strategy.server_evaluate = loss
    guard = _configured(strategy)
    arrays, _ = guard.aggregate_train(1, _replies())
    assert arrays is not None
    q = np.exp(-np.array([1.0, 2.0, 0.0, -2.0]) / tau)
    np.testing.assert_allclose(arrays["w"].numpy(), _hand_w(N * q), rtol=1e-6)
    strategy.server_evaluate = None
    guard.configure_train(
        2, to_array_record(GLOBAL), ConfigRecord(), LocalGrid({i: None for i in range(1, 5)})
    )
    with pytest.raises(RuntimeError, match="server_val_fraction"):
        guard.aggregate_train(2, _replies())


def test_existing_rules_get_a_cheap_context_and_old_call_forms_work() -> None:
    seen: list[QualityContext] = []

    @register_quality("test_spy")
    def spy(metrics, ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx)
        return 1.0

    try:
        assert QUALITY.get("test_spy").needs == ()
        arrays, _ = QualityWeightedFedAvg(quality="test_spy").aggregate_train(1, _replies())
        assert arrays is not None
        assert [c.index for c in seen] == [0, 1, 2, 3]
        assert all(c.global_arrays is None and c.updates == () and c.evaluate is None for c in seen)
    finally:
        QUALITY.unregister("test_spy")
    ctx = QualityContext(1, 2.0, ({"budget": 4.0},))  # positional form of earlier versions
    assert quality_function("budget")({"budget": 4.0}, ctx) == 1.0
    with pytest.raises(ValueError, match="needs"):
        register_quality("test_bad_needs", needs=("gradients",))


# ---------------------------------------------------------------------------- server split


def _quick(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(CONFIGS / "quick.yaml", list(overrides))


def test_server_split_is_disjoint_from_client_data_and_deterministic() -> None:
    cfg = _quick("data.server_val_fraction=0.1")
    x, y = server_validation(cfg.data, cfg.seed)
    parts = client_partitions(cfg.data, cfg.num_clients, cfg.seed)
    n_train = 1437  # digits: 1,797 examples, 20% test
    assert len(y) == math.ceil(0.1 * n_train) and x.shape[1:] == (1, 8, 8)
    clients = np.concatenate(parts)
    assert len(clients) + len(y) == n_train and len(np.unique(clients)) == len(clients)
    x2, y2 = server_validation(_quick("data.server_val_fraction=0.1").data, cfg.seed)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert len(np.unique(y)) == 10  # stratified
    for pid in range(cfg.num_clients):  # no client row equals a server row
        data = load_client_data(cfg.data, pid, cfg.num_clients, cfg.seed)
        rows = np.concatenate([data.x_train, data.x_val]).reshape(-1, 64)
        server_rows = {r.tobytes() for r in x.reshape(-1, 64)}
        assert not server_rows & {r.tobytes() for r in rows}
    off = _quick()
    assert len(server_validation(off.data, off.seed)[1]) == 0
    assert sum(len(p) for p in client_partitions(off.data, off.num_clients, off.seed)) == n_train


@pytest.mark.parametrize("bad", ["0.5", "-0.1"])
def test_server_val_fraction_range(bad: str) -> None:
    with pytest.raises(ConfigError, match="data.server_val_fraction"):
        _quick(f"data.server_val_fraction={bad}")


def test_server_val_without_split_fails_before_work_naming_the_key() -> None:
    cfg = _quick("strategy.kwargs.quality=server_val")
    with pytest.raises(ConfigError, match=r"^data\.server_val_fraction: .*server_val"):
        strategy_for(cfg)


def test_server_evaluator_is_attached_and_scores_at_the_largest_budget() -> None:
    cfg = _quick("strategy.kwargs.quality=server_val", "data.server_val_fraction=0.05")
    guard = strategy_for(cfg)
    x, y = server_validation(cfg.data, cfg.seed)
    model = build_model(cfg.model.name, (1, 8, 8), 10, cfg.model)
    attach_server_evaluator(guard, cfg, model, "cpu")
    evaluator = guard.strategy.server_evaluate
    assert isinstance(evaluator, ServerEvaluator) and evaluator.model is not model
    assert evaluator.settings["f_max_iter"] == 8 and evaluator.settings["solver"] == "anderson"
    arrays = ArrayRecord(model.state_dict())
    expected = evaluate(model, x, y, **evaluator.settings).loss
    assert evaluator(arrays) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(("name", "pick"), [("bound_upper", max), ("bound_lower", min)])
def test_bound_configs_give_uniform_budgets(name: str, pick) -> None:  # type: ignore[no-untyped-def]
    default = default_config().devices.tiers
    ref = pick(default, key=lambda t: t.f_max_iter)
    tiers = load_config(CONFIGS / f"{name}.yaml").devices.tiers
    assert len(tiers) == len(default)
    solver_keys = ("solver", "f_max_iter", "b_max_iter", "backward")
    for tier, base in zip(tiers, default, strict=True):
        assert all(getattr(tier, k) == getattr(ref, k) for k in solver_keys)
        others = set(type(base).model_fields) - set(solver_keys)
        assert {k: getattr(tier, k) for k in others} == {k: getattr(base, k) for k in others}
