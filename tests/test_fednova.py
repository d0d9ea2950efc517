"""FedNova-style normalised averaging: hand computations, equal work = FedAvg, guard and weights hook."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg

from strategies import FedNova, ReplyGuard, build_strategy
from tests.flwr_helpers import LocalGrid, client_metrics, make_reply, task_identity, to_array_record

GLOBAL = {"w": np.array([1.0, 2.0], np.float32), "c": np.asarray(5, np.int64)}
ARRAYS = [
    {"w": np.array([3.0, 0.0], np.float32), "c": np.asarray(6, np.int64)},  # Δ_1 = [2, -2]
    {"w": np.array([1.0, 6.0], np.float32), "c": np.asarray(9, np.int64)},  # Δ_2 = [0, 4]
]
N = [10, 30]  # p = [0.25, 0.75]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _replies(steps: list[int], fwd: list[float], bwd: list[float]) -> list[Message]:
    return [
        make_reply(
            i + 1,
            ARRAYS[i],
            client_metrics(num_examples=N[i], local_steps=steps[i], nfe_fwd=fwd[i], nfe_bwd=bwd[i]),
        )
        for i in range(2)
    ]


def _guard(work: str) -> ReplyGuard:
    guard = ReplyGuard(FedNova(work=work, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2))
    grid = LocalGrid({1: lambda m: m.content, 2: lambda m: m.content})
    sent = list(guard.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid))
    assert len(sent) == 2
    return guard


def test_steps_matches_hand_computation() -> None:
    guard = _guard("steps")
    arrays, metrics = guard.aggregate_train(1, _replies([2, 4], [3, 1], [1, 1]))
    assert arrays is not None and metrics is not None
    # tau = [2, 4], tau_eff = 0.25*2 + 0.75*4 = 3.5, sum p Δ/tau = [0.25, 0.5] -> θ + 3.5*[0.25, 0.5]
    np.testing.assert_allclose(arrays["w"].numpy(), [1.875, 3.75], rtol=0, atol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32
    assert arrays["c"].numpy() == 8 and arrays["c"].numpy().dtype == np.int64  # rint(0.25*6 + 0.75*9)
    assert metrics["fednova-tau-eff"] == pytest.approx(3.5)
    # c_i = p_i tau_eff / tau_i = [0.4375, 0.65625], sum 1.09375, normalised [0.4, 0.6]
    assert guard.strategy.last_weights == pytest.approx({1: 0.4375, 2: 0.65625})
    assert metrics["fednova-coef-sum"] == pytest.approx(1.09375)
    assert [e["weight"] for e in guard.client_log] == pytest.approx([0.4, 0.6])


def test_nfe_matches_hand_computation() -> None:
    guard = _guard("nfe")
    arrays, metrics = guard.aggregate_train(1, _replies([2, 4], [3, 1], [1, 0]))
    assert arrays is not None and metrics is not None
    # tau = [2*(3+1), 4*(1+0)] = [8, 4], tau_eff = 5, sum p Δ/tau = [0.0625, 0.6875]
    np.testing.assert_allclose(arrays["w"].numpy(), [1.3125, 5.4375], rtol=0, atol=1e-6)
    assert metrics["fednova-tau-eff"] == pytest.approx(5.0)
    assert guard.strategy.last_weights == pytest.approx({1: 0.25 * 5 / 8, 2: 0.75 * 5 / 4})


@pytest.mark.parametrize("work", ["steps", "nfe"])
def test_equal_work_equals_flower_fedavg(work: str) -> None:
    # steps [3, 3]; nfe: 3*(2+2) = 12 = 3*(3+1)
    replies = _replies([3, 3], [2, 3], [2, 1])
    ref, _ = FedAvg().aggregate_train(1, replies)
    guard = _guard(work)
    arrays, _ = guard.aggregate_train(1, _replies([3, 3], [2, 3], [2, 1]))
    assert ref is not None and arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), ref["w"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(arrays["w"].numpy(), [1.5, 4.5], rtol=1e-6)  # 0.25*[3,0] + 0.75*[1,6]
    assert [e["weight"] for e in guard.client_log] == pytest.approx([0.25, 0.75])


def test_guard_rejects_replies_without_the_work_metrics() -> None:
    guard = _guard("nfe")
    assert {"local-steps", "nfe-fwd", "nfe-bwd"} <= set(guard.required_keys(train=True))
    replies = _replies([2, 4], [3, 1], [1, 1])
    metrics = client_metrics(num_examples=20)
    del metrics["local-steps"]
    replies.append(make_reply(3, ARRAYS[0], metrics))
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None
    assert guard.round_counts[1] == {"ok": 2, "rejected": 1, "failed": 0}
    assert "local-steps" in guard.client_log[-1]["reason"]


def test_zero_work_reply_is_left_out_and_aggregation_needs_configure_train() -> None:
    guard = _guard("steps")
    arrays, _ = guard.aggregate_train(1, _replies([0, 4], [3, 1], [1, 1]))
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), ARRAYS[1]["w"])  # only reply 2: θ + Δ_2
    assert [e["weight"] for e in guard.client_log] == [0.0, 1.0]
    with pytest.raises(RuntimeError, match="configure_train"):
        FedNova().aggregate_train(1, _replies([2, 4], [3, 1], [1, 1]))


def test_registered_and_work_validated() -> None:
    guard = build_strategy("fednova", {"work": "nfe"}, fraction_train=0.5)
    assert isinstance(guard.strategy, FedNova) and guard.strategy.work == "nfe"
    assert guard.strategy.fraction_train == 0.5
    with pytest.raises(ValueError, match=r"work='flops'.*'nfe', 'steps'"):
        build_strategy("fednova", {"work": "flops"})
