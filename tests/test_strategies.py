"""Tests for strategies/: the ReplyGuard wrapper, QualityWeightedFedAvg, quality functions, the registry."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, QFedAvg

from fedeq.registry import QUALITY
from fedeq.server.callbacks import RoundCallback
from strategies import (
    STRATEGIES,
    QualityContext,
    QualityFunction,
    QualityWeightedFedAvg,
    ReplyGuard,
    build_strategy,
    quality_function,
    register_quality,
    resolve_strategy_class,
)
from tests.flwr_helpers import (
    LocalGrid,
    client_metrics,
    make_error_reply,
    make_reply,
    run_local,
    task_identity,
    to_array_record,
)

RNG = np.random.default_rng(1234)


class MyStrategy(FedAvg):
    """Plug-in strategy resolved through ``tests.test_strategies:MyStrategy``."""

    def __init__(self, alpha: float = 0.0, fraction_train: float = 1.0, min_train_nodes: int = 2) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes)
        self.alpha = alpha


class NotAStrategy:
    """Importable class that is not a Flower strategy."""


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


# ---------------------------------------------------------------------------- fixtures


N = np.array([10.0, 30.0, 20.0])
RESIDUAL = np.array([0.1, 0.5, 1.2])
BUDGET = np.array([5.0, 10.0, 20.0])
VAL_LOSS = np.array([0.3, 0.9, 0.6])
TIER = [0, 1, 2]
TAU = 0.7


def _client_arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    return {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float64),
        "count": np.asarray([3, 4, 7][i], dtype=np.int64),  # weighted means are non-integers
    }


def _replies() -> list[Message]:
    return [
        make_reply(
            i + 1,
            _client_arrays(i),
            client_metrics(
                num_examples=int(N[i]),
                fp_residual=float(RESIDUAL[i]),
                budget=float(BUDGET[i]),
                val_loss=float(VAL_LOSS[i]),
                tier=TIER[i],
                train_loss=float(i + 1),
            ),
        )
        for i in range(3)
    ]


def _hand_average(weights: np.ndarray) -> dict[str, np.ndarray]:
    arrays = [_client_arrays(i) for i in range(3)]
    out = {}
    for key in ("w", "b", "count"):
        avg = sum(w * a[key].astype(np.float64) for w, a in zip(weights, arrays, strict=True)) / weights.sum()
        dtype = arrays[0][key].dtype
        out[key] = (np.rint(avg) if dtype.kind == "i" else avg).astype(dtype)
    return out


HAND_QUALITY = {
    "residual": np.exp(-RESIDUAL / TAU),
    "budget": BUDGET / BUDGET.max(),
    "val_loss": np.exp(-VAL_LOSS / TAU),
    "uniform": np.ones(3),
}


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


# ---------------------------------------------------------------------------- quality weighting


@pytest.mark.parametrize("quality", sorted(HAND_QUALITY))
def test_quality_weighted_average_matches_hand_computation(quality: str) -> None:
    strategy = ReplyGuard(QualityWeightedFedAvg(quality=quality, temperature=TAU))
    arrays, metrics = strategy.aggregate_train(1, _replies())
    assert arrays is not None and metrics is not None

    q = HAND_QUALITY[quality]
    expected = _hand_average(N * q)
    got = _numpy(arrays)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].shape == expected[key].shape, key
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert metrics["quality-mean"] == pytest.approx(float(q.mean()))
    assert metrics["quality-fallback"] == 0
    assert strategy.strategy.last_weights == pytest.approx(
        {i + 1: float(w) for i, w in enumerate(N * q / (N * q).sum())}
    )
    assert strategy.round_counts[1] == {"ok": 3, "rejected": 0, "failed": 0}


def test_quality_functions_direct() -> None:
    ctx = QualityContext(server_round=1, temperature=2.0, round_metrics=({"budget": 4.0}, {"budget": 16.0}))
    assert quality_function("residual")({"fp-residual": 0.5}, ctx) == pytest.approx(math.exp(-0.25))
    assert quality_function("val_loss")({"val-loss": 3.0}, ctx) == pytest.approx(math.exp(-1.5))
    assert quality_function("budget")({"budget": 4.0}, ctx) == pytest.approx(0.25)
    assert quality_function("uniform")({}, ctx) == 1.0


@pytest.mark.parametrize(
    ("name", "module", "requires"),
    [
        ("residual", "strategies.quality.residual", ("fp-residual",)),
        ("budget", "strategies.quality.budget", ("budget",)),
        ("val_loss", "strategies.quality.val_loss", ("val-loss",)),
        ("uniform", "strategies.quality.uniform", ()),
    ],
)
def test_each_quality_module_registers_its_function_with_its_requirements(
    name: str, module: str, requires: tuple[str, ...]
) -> None:
    registered = QUALITY.get(name)
    assert isinstance(registered, QualityFunction)
    assert registered.name == name and registered.requires == requires
    assert registered.fn.__module__ == module
    assert QualityWeightedFedAvg(quality=name).required_metrics == requires


def test_uniform_equals_flower_fedavg() -> None:
    ref_arrays, ref_metrics = FedAvg().aggregate_train(1, _replies())
    arrays, metrics = QualityWeightedFedAvg(quality="uniform").aggregate_train(1, _replies())
    assert ref_arrays is not None and arrays is not None and ref_metrics is not None and metrics is not None
    assert list(arrays.keys()) == list(ref_arrays.keys())
    for key in ("w", "b"):
        np.testing.assert_allclose(arrays[key].numpy(), ref_arrays[key].numpy(), rtol=1e-6, atol=1e-7)
        assert arrays[key].numpy().dtype == ref_arrays[key].numpy().dtype
    # Flower promotes the int64 counter to float64; the guard keeps the global dtype (rounded).
    np.testing.assert_allclose(arrays["count"].numpy(), np.rint(ref_arrays["count"].numpy()))
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value), key


def test_tier_metrics_and_weighted_means() -> None:
    replies = [
        make_reply(
            1, _client_arrays(0), client_metrics(num_examples=10, train_loss=1.0, fp_residual=0.2, tier=0)
        ),
        make_reply(
            2, _client_arrays(1), client_metrics(num_examples=30, train_loss=2.0, fp_residual=0.4, tier=0)
        ),
        make_reply(
            3, _client_arrays(2), client_metrics(num_examples=20, train_loss=4.0, fp_residual=0.1, tier=1)
        ),
    ]
    _, metrics = QualityWeightedFedAvg(quality="uniform").aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0 + 20 * 4.0) / 60)
    assert metrics["tier0/train-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert metrics["tier0/fp-residual"] == pytest.approx((10 * 0.2 + 30 * 0.4) / 40)
    assert metrics["tier0/num-clients"] == 2
    assert metrics["tier0/num-examples"] == 40
    assert metrics["tier1/train-loss"] == pytest.approx(4.0)
    assert metrics["tier1/num-clients"] == 1
    assert metrics["quality-mean"] == pytest.approx(1.0)
    assert "num-examples" not in metrics


def test_zero_quality_falls_back_to_example_weights() -> None:
    replies = [
        make_reply(i + 1, _client_arrays(i), client_metrics(num_examples=int(N[i]), budget=0.0))
        for i in range(3)
    ]
    strategy = QualityWeightedFedAvg(quality="budget")
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["quality-fallback"] == 1
    expected = _hand_average(N)
    np.testing.assert_allclose(arrays["w"].numpy(), expected["w"], rtol=1e-6)


def test_register_quality_plugin() -> None:
    @register_quality("test_inverse_loss", requires=("train-loss",))
    def inverse_loss(metrics, ctx):  # type: ignore[no-untyped-def]
        return 1.0 / float(metrics["train-loss"])

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_quality("test_inverse_loss")(inverse_loss)
        assert QUALITY.get("test_inverse_loss").requires == ("train-loss",)
        strategy = ReplyGuard(QualityWeightedFedAvg(quality="test_inverse_loss"))
        assert "train-loss" in strategy.required_keys(train=True)
        arrays, _ = strategy.aggregate_train(1, _replies())
        assert arrays is not None
        loss = np.array([1.0, 2.0, 3.0])
        np.testing.assert_allclose(arrays["w"].numpy(), _hand_average(N / loss)["w"], rtol=1e-6)

        register_quality("test_inverse_loss", overwrite=True)(lambda metrics, ctx: 1.0)
        assert QUALITY.get("test_inverse_loss").requires == ()
        arrays, _ = QualityWeightedFedAvg(quality="test_inverse_loss").aggregate_train(1, _replies())
        assert arrays is not None
        np.testing.assert_allclose(arrays["w"].numpy(), _hand_average(N)["w"], rtol=1e-6)
    finally:
        QUALITY.unregister("test_inverse_loss")
    assert "test_inverse_loss" not in QUALITY
    with pytest.raises(ValueError, match="identifier"):
        register_quality("not-an-identifier")(inverse_loss)


def test_invalid_quality_and_temperature() -> None:
    with pytest.raises(ValueError, match=r"quality=.*'nope'.*residual"):
        QualityWeightedFedAvg(quality="nope")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            QualityWeightedFedAvg(temperature=bad)


def test_quality_requirement_rejects_reply_without_metric() -> None:
    metrics = client_metrics()
    del metrics["fp-residual"]
    replies = _replies()[:2] + [make_reply(9, _client_arrays(2), metrics)]
    strategy = ReplyGuard(QualityWeightedFedAvg(quality="residual"))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.round_counts[1] == {"ok": 2, "rejected": 1, "failed": 0}
    assert "fp-residual" in strategy.client_log[-1]["reason"]


# ---------------------------------------------------------------------------- reply guard


GLOBAL = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float64), "count": np.asarray(0, np.int64)}


def _bad_replies() -> dict[int, tuple[Message, str]]:
    nan = _client_arrays(0)
    nan["w"][0, 0] = np.nan
    inf = _client_arrays(0)
    inf["b"][1] = np.inf
    shape = _client_arrays(0)
    shape["w"] = np.zeros((4, 3), np.float32)
    keys = _client_arrays(0)
    del keys["b"]
    dtype = _client_arrays(0)
    dtype["w"] = dtype["w"].astype(np.float64)
    missing = client_metrics()
    del missing["num-examples"]
    return {
        11: (make_reply(11, nan, client_metrics()), "nan"),
        12: (make_reply(12, inf, client_metrics()), "inf"),
        13: (make_reply(13, shape, client_metrics()), "shape"),
        14: (make_reply(14, keys, client_metrics()), "keys"),
        15: (make_reply(15, dtype, client_metrics()), "dtype"),
        16: (make_reply(16, _client_arrays(0), missing), "missing"),
        17: (make_reply(17, _client_arrays(0), client_metrics(train_loss=float("nan"))), "non-finite metric"),
        18: (make_reply(18, _client_arrays(0), client_metrics(num_examples=0)), "positive"),
        19: (make_reply(19, metrics=client_metrics()), "arrayrecord"),
    }


@pytest.mark.parametrize("name", ["fedavg", "quality"])
def test_guard_rejects_invalid_replies(name: str, caplog: pytest.LogCaptureFixture) -> None:
    strategy = build_strategy(name, {"quality": "uniform"} if name == "quality" else None)
    assert isinstance(strategy, ReplyGuard)
    strategy.set_global_arrays(to_array_record(GLOBAL))
    bad = _bad_replies()
    good = _replies()[:2]
    replies = [good[0], *(m for m, _ in bad.values()), make_error_reply(20, "boom"), good[1]]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(3, replies)

    assert arrays is not None and metrics is not None
    weights = np.array([10.0, 30.0])
    for key in ("w", "b"):
        expected = (
            sum(w * _client_arrays(i)[key].astype(np.float64) for i, w in enumerate(weights)) / weights.sum()
        )
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert arrays["count"].numpy().dtype == np.int64
    assert strategy.round_counts[3] == {"ok": 2, "rejected": len(bad), "failed": 1}
    assert strategy.total_counts() == {"ok": 2, "rejected": len(bad), "failed": 1}
    log = {e["node_id"]: e for e in strategy.client_log}
    assert [log[n]["status"] for n in (1, 2)] == ["ok", "ok"]
    assert log[1]["train-loss"] == 1.0 and log[1]["round"] == 3 and log[1]["reason"] is None
    for node, (_, word) in bad.items():
        assert log[node]["status"] == "rejected", node
        assert word in log[node]["reason"].lower(), (node, log[node]["reason"])
    assert log[20]["status"] == "failed" and "boom" in log[20]["reason"]
    assert sorted(strategy.rejected_nodes(3)) == [*sorted(bad), 20]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for node in [*bad, 20]:
        assert f"node {node} " in warned


def test_guard_all_rejected_returns_none() -> None:
    strategy = build_strategy("quality")
    strategy.set_global_arrays(to_array_record(GLOBAL))
    replies = [m for m, _ in _bad_replies().values()] + [make_error_reply(30)]
    assert strategy.aggregate_train(2, replies) == (None, None)
    assert strategy.round_counts[2] == {"ok": 0, "rejected": len(replies) - 1, "failed": 1}
    assert strategy.aggregate_train(3, []) == (None, None)


def test_guard_captures_global_layout_in_configure_train() -> None:
    strategy = build_strategy("fedavg", min_available_nodes=1, min_train_nodes=1)
    grid = LocalGrid({1: lambda m: RecordDict()})
    instructions = list(strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid))
    assert len(instructions) == 1
    assert strategy.global_layout == {
        "w": ((3, 4), "float32"),
        "b": ((4,), "float64"),
        "count": ((), "int64"),
    }
    # Majority would accept a float64 "w" if all clients sent one; the captured global layout does not.
    wrong = [
        make_reply(i + 1, {**_client_arrays(i), "w": np.zeros((3, 4))}, client_metrics()) for i in range(3)
    ]
    assert strategy.aggregate_train(1, wrong) == (None, None)


def test_guard_with_fedmedian_and_int_dtype_kept() -> None:
    strategy = build_strategy("fedmedian")
    assert isinstance(strategy, ReplyGuard) and type(strategy.strategy) is FedMedian
    strategy.set_global_arrays(to_array_record(GLOBAL))
    replies = [*_replies(), _bad_replies()[11][0]]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    stacked = np.stack([_client_arrays(i)["w"] for i in range(3)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.median(stacked, axis=0), rtol=1e-6)
    assert arrays["count"].numpy().dtype == np.int64
    assert strategy.round_counts[1]["rejected"] == 1


def test_guard_wraps_a_strategy_instance_and_hides_nan_replies_from_it() -> None:
    inner = FedMedian(min_available_nodes=1, min_train_nodes=1)
    seen: list[list[int]] = []
    aggregate = inner.aggregate_train

    def spy(server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        seen.append([int(m.metadata.src_node_id) for m in replies])
        return aggregate(server_round, replies)

    inner.aggregate_train = spy  # type: ignore[method-assign]
    guard = ReplyGuard(inner)
    assert guard.strategy is inner
    guard.set_global_arrays(to_array_record(GLOBAL))
    nan_reply = _bad_replies()[11][0]
    replies = [*_replies(), nan_reply]

    # what the NaN reply does without the guard (Flower's aggregation consumes the replies: fresh ones)
    unguarded, _ = FedMedian().aggregate_train(1, [*_replies(), _bad_replies()[11][0]])
    assert unguarded is not None and np.isnan(unguarded["w"].numpy()).any()

    arrays, _ = guard.aggregate_train(1, replies)
    assert seen == [[1, 2, 3]]  # node 11's NaN reply never reached the inner strategy
    assert arrays is not None and np.isfinite(arrays["w"].numpy()).all()
    stacked = np.stack([_client_arrays(i)["w"] for i in range(3)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.median(stacked, axis=0), rtol=1e-6)
    assert guard.round_counts[1] == {"ok": 3, "rejected": 1, "failed": 0}
    assert "not finite" in guard.client_log[-1]["reason"]

    guard.set_global_arrays(to_array_record(GLOBAL))
    assert guard.aggregate_train(2, [nan_reply]) == (None, None)
    assert seen == [[1, 2, 3]]  # nothing valid: the inner strategy is not called at all


def test_guard_delegates_configuration_summary_and_start() -> None:
    class Recording(FedAvg):
        def __init__(self) -> None:
            super().__init__(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
            self.calls: list[str] = []

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            self.calls.append(f"configure_train {server_round}")
            return super().configure_train(server_round, arrays, config, grid)

        def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            self.calls.append(f"configure_evaluate {server_round}")
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
            self.calls.append(f"aggregate_evaluate {server_round} {len(list(replies))}")
            return super().aggregate_evaluate(server_round, replies)

        def summary(self) -> None:
            self.calls.append("summary")

    inner = Recording()
    guard = ReplyGuard(inner, required_eval_metrics=("num-examples", "val-loss"))
    initial = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    clients = {n: _make_client(n) for n in (1, 2, 3)}  # node 3 replies NaN: rejected in both phases
    result, _ = run_local(guard, clients, initial, num_rounds=1, timeout=5)
    assert inner.calls == ["summary", "configure_train 1", "configure_evaluate 1", "aggregate_evaluate 1 2"]
    assert guard.round_counts[1] == {"ok": 2, "rejected": 1, "failed": 0}
    assert guard.eval_round_counts[1] == {"ok": 2, "rejected": 1, "failed": 0}
    assert np.isfinite(result.arrays["w"].numpy()).all()
    with pytest.raises(TypeError, match="flwr Strategy instance"):
        ReplyGuard(FedAvg)  # type: ignore[arg-type]


def test_guard_aggregate_evaluate() -> None:
    strategy = build_strategy("fedavg")
    ev = MessageType.EVALUATE
    replies = [
        make_reply(1, metrics={"num-examples": 10, "val-loss": 1.0}, message_type=ev),
        make_reply(2, metrics={"num-examples": 30, "val-loss": 2.0}, message_type=ev),
        make_reply(3, metrics={"num-examples": 30, "val-loss": float("inf")}, message_type=ev),
        make_error_reply(4, message_type=ev),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    assert metrics["val-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert strategy.eval_round_counts[1] == {"ok": 2, "rejected": 1, "failed": 1}
    assert strategy.round_counts == {}
    assert strategy.aggregate_evaluate(2, replies[2:]) is None


def test_guard_rejects_minority_metric_keys() -> None:
    odd = client_metrics()
    odd["extra"] = 1.0
    replies = [*_replies(), make_reply(9, _client_arrays(0), odd)]
    strategy = build_strategy("fedavg")
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.round_counts[1] == {"ok": 3, "rejected": 1, "failed": 0}
    assert "extra" in strategy.client_log[-1]["reason"]


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_builtin_builds(name: str) -> None:
    kwargs = {"client_learning_rate": 0.1} if name == "qfedavg" else {}
    strategy = build_strategy(name, kwargs, fraction_train=0.5, not_a_parameter=1)
    assert isinstance(strategy, ReplyGuard)
    assert type(strategy.strategy) is STRATEGIES[name]
    assert strategy.strategy.fraction_train == 0.5
    assert strategy.required_metrics[0] == "num-examples"
    if name == "qfedavg":
        assert isinstance(strategy.strategy, QFedAvg) and strategy.strategy.train_loss_key == "train-loss"


def test_build_is_stable_and_user_kwargs_win() -> None:
    a = build_strategy("fedavg", {"fraction_train": 0.25}, fraction_train=0.5)
    b = build_strategy("FedAvg")
    assert type(a) is type(b) is ReplyGuard and type(a.strategy) is type(b.strategy) is FedAvg
    assert a.strategy.fraction_train == 0.25
    q = build_strategy(
        "quality", {"quality": "budget", "temperature": 2.0, "required_metrics": ["num-examples", "tier"]}
    )
    assert type(q.strategy) is QualityWeightedFedAvg
    assert (q.strategy.quality, q.strategy.temperature) == ("budget", 2.0)
    assert q.required_metrics == ("num-examples", "tier")  # the guard's own; the quality adds "budget"
    assert set(q.required_keys(train=True)) == {"num-examples", "tier", "budget"}


def test_plugin_strategy_resolves_and_receives_kwargs() -> None:
    assert resolve_strategy_class("tests.test_strategies:MyStrategy") is MyStrategy
    strategy = build_strategy(
        "tests.test_strategies:MyStrategy", {"alpha": 0.25}, fraction_train=0.5, fraction_evaluate=0.3
    )
    assert isinstance(strategy, ReplyGuard) and type(strategy.strategy) is MyStrategy
    inner = strategy.strategy
    assert inner.alpha == 0.25
    assert inner.fraction_train == 0.5
    assert inner.fraction_evaluate == 1.0  # default not accepted by MyStrategy -> dropped


def test_unknown_name_and_bad_kwargs_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"strategy\.name.*'nope'.*fedavg"):
        build_strategy("nope")
    with pytest.raises(ValueError, match=r"strategy\.name.*No module named"):
        resolve_strategy_class("tests.no_such_module:Foo")
    with pytest.raises(ValueError, match=r"strategy\.name.*AttributeError"):
        resolve_strategy_class("tests.test_strategies:Missing")
    with pytest.raises(ValueError, match=r"strategy\.name.*not a flwr Strategy"):
        resolve_strategy_class("tests.test_strategies:NotAStrategy")
    with pytest.raises(ValueError, match=r"strategy\.kwargs\.fraction_evaluate.*alpha"):
        build_strategy("tests.test_strategies:MyStrategy", {"fraction_evaluate": 0.5})
    with pytest.raises(ValueError, match=r"strategy\.kwargs\.bogus.*fraction_train"):
        build_strategy("fedavg", {"bogus": 1})
    with pytest.raises(ValueError, match=r"strategy\.kwargs\.client_learning_rate"):
        build_strategy("qfedavg")
    with pytest.raises(ValueError, match=r"strategy\.kwargs.*quality"):
        build_strategy("quality", {"quality": "nope"})


# ---------------------------------------------------------------------------- end to end


TARGETS = {1: 1.0, 2: -2.0}
EXAMPLES = {1: 10, 2: 30}
RESIDUALS = {1: 0.05, 2: 0.5}


def _make_client(node_id: int):  # type: ignore[no-untyped-def]
    def client(msg: Message) -> RecordDict:
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        if msg.metadata.message_type == MessageType.EVALUATE:
            loss = float("nan") if node_id == 3 else float(np.abs(arrays["w"]).mean())
            return RecordDict({"metrics": MetricRecord({"num-examples": 5, "val-loss": loss})})
        if node_id == 5:
            raise RuntimeError("out of memory")
        if node_id == 3:
            new = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
        elif node_id == 4:
            new = {"w": np.zeros((2, 2), np.float32), "b": arrays["b"]}
        else:
            new = {k: v + np.asarray(0.5 * (TARGETS[node_id] - v), dtype=v.dtype) for k, v in arrays.items()}
        metrics = client_metrics(
            num_examples=EXAMPLES.get(node_id, 100),
            fp_residual=RESIDUALS.get(node_id, 0.01),
            tier=0 if node_id == 1 else 1,
        )
        return RecordDict({"arrays": to_array_record(new), "metrics": MetricRecord(metrics)})

    return client


def test_start_two_rounds_with_local_grid() -> None:
    initial = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    grid = LocalGrid({n: _make_client(n) for n in range(1, 6)})
    strategy = ReplyGuard(QualityWeightedFedAvg(quality="residual", temperature=0.5, min_available_nodes=5))
    result = strategy.start(grid=grid, initial_arrays=to_array_record(initial), num_rounds=2, timeout=5)

    # Hand computation over the two valid clients only.
    theta = {k: v.astype(np.float64) for k, v in initial.items()}
    w = np.array([EXAMPLES[n] * math.exp(-RESIDUALS[n] / 0.5) for n in (1, 2)])
    for _ in range(2):
        theta = {
            k: sum(wi * (v + 0.5 * (TARGETS[n] - v)) for wi, n in zip(w, (1, 2), strict=True)) / w.sum()
            for k, v in theta.items()
        }
    final = _numpy(result.arrays)
    for key in initial:
        assert final[key].dtype == np.float32
        assert not np.allclose(final[key], initial[key])
        np.testing.assert_allclose(final[key], theta[key], rtol=1e-5)

    for rnd in (1, 2):
        assert strategy.round_counts[rnd] == {"ok": 2, "rejected": 2, "failed": 1}
        assert sorted(strategy.rejected_nodes(rnd)) == [3, 4, 5]
        assert strategy.eval_round_counts[rnd] == {"ok": 4, "rejected": 1, "failed": 0}
        train = result.train_metrics_clientapp[rnd]
        assert train["tier0/num-clients"] == 1 and train["tier1/num-clients"] == 1
        assert train["tier0/fp-residual"] == pytest.approx(RESIDUALS[1])
    assert len(grid.sent) == 2 * (5 + 5)
    assert all(m.metadata.run_id == grid.run.run_id for m in grid.sent)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_builtin_runs_and_excludes_bad_clients(name: str) -> None:
    kwargs = {"client_learning_rate": 0.1} if name == "qfedavg" else {}
    strategy = build_strategy(name, kwargs, min_available_nodes=5)
    initial = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    clients = {n: _make_client(n) for n in range(1, 6)}
    clients[6] = clients[7] = _make_client(1)  # enough honest replies for Krum/Bulyan
    result, _ = run_local(strategy, clients, initial, num_rounds=2, timeout=5)
    final = _numpy(result.arrays)
    assert set(final) == set(initial)
    for key, value in final.items():
        assert value.dtype == np.float32 and value.shape == initial[key].shape
        assert np.isfinite(value).all()
    assert not np.allclose(final["w"], initial["w"])
    assert strategy.round_counts[2] == {"ok": 4, "rejected": 2, "failed": 1}


# ---------------------------------------------------------------------------- round loop


def _run_rounds_recording(overlap: bool, fail_at: int | None = None):  # type: ignore[no-untyped-def]
    import random
    import threading

    from fedeq.server.loop import run_rounds

    random.seed(0)  # the strategy samples its clients with Python's RNG

    events: list[tuple[str, int, str]] = []
    evaluated: dict[int, dict[str, np.ndarray]] = {}

    class Evaluation(RoundCallback):
        def on_round_end(self, server_round: int, arrays: ArrayRecord) -> None:
            events.append(("end", server_round, threading.current_thread().name))

        def after_round(self, server_round, arrays, metrics):  # type: ignore[no-untyped-def]
            if server_round == fail_at:
                raise RuntimeError(f"evaluation of round {server_round} failed")
            evaluated[server_round] = _numpy(arrays)
            events.append(("evaluate", server_round, threading.current_thread().name))
            return {"w-mean": float(evaluated[server_round]["w"].mean()), "note": "not a number"}

    class Finish(RoundCallback):
        def on_run_start(self, start_round: int, arrays: ArrayRecord) -> None:
            events.append(("start", start_round, threading.current_thread().name))

        def after_round(self, server_round, arrays, metrics):  # type: ignore[no-untyped-def]
            assert metrics["w-mean"] == float(evaluated[server_round]["w"].mean())  # the earlier callback's
            if server_round > 0:
                events.append(("finish", server_round, threading.current_thread().name))
            return {"finished": server_round}

        def on_run_end(self, result) -> None:  # type: ignore[no-untyped-def]
            events.append(("run-end", len(result.train_metrics_clientapp), threading.current_thread().name))

    initial = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    grid = LocalGrid({n: _make_client(n) for n in range(1, 6)})
    strategy = ReplyGuard(QualityWeightedFedAvg(quality="residual", temperature=0.5, min_available_nodes=5))
    with task_identity(run_id=grid.run.run_id):
        result = run_rounds(
            strategy,
            grid,
            to_array_record(initial),
            3,
            callbacks=[Evaluation(), Finish()],
            overlap=overlap,
            timeout=5,
        )
    return result, events, evaluated, strategy


def test_overlapped_round_end_gives_the_same_run() -> None:
    seq, seq_events, seq_eval, seq_strategy = _run_rounds_recording(overlap=False)
    ovl, ovl_events, ovl_eval, ovl_strategy = _run_rounds_recording(overlap=True)
    for key, value in _numpy(seq.arrays).items():
        np.testing.assert_array_equal(_numpy(ovl.arrays)[key], value)
    assert seq.evaluate_metrics_serverapp == ovl.evaluate_metrics_serverapp
    assert sorted(ovl.evaluate_metrics_serverapp) == [0, 1, 2, 3]
    for rnd, metrics in ovl.evaluate_metrics_serverapp.items():  # the callbacks' numbers, merged
        assert set(metrics) == {"w-mean", "finished"} and metrics["finished"] == rnd
    for rnd, arrays in seq_eval.items():  # each evaluation saw its own round's model
        for key, value in arrays.items():
            np.testing.assert_array_equal(ovl_eval[rnd][key], value)
    assert seq_strategy.client_log == ovl_strategy.client_log
    # Sequentially everything runs in the caller's thread, in round order.
    assert {name for *_, name in seq_events} == {"MainThread"}
    # Overlapped: rounds 1-2 are evaluated and finished in the background thread, after their round end,
    # each before the next round's end; the last round finishes in the caller's thread.
    steps = [(kind, rnd) for kind, rnd, _ in ovl_events]
    for r in (1, 2):
        order = [steps.index((kind, r)) for kind in ("end", "evaluate", "finish")]
        assert order == sorted(order) and order[-1] < steps.index(("end", r + 1))
    threads = {(kind, rnd): name for kind, rnd, name in ovl_events}
    assert threads[("evaluate", 1)].startswith("fedeq-round-end")
    assert threads[("finish", 2)].startswith("fedeq-round-end")
    assert threads[("evaluate", 3)] == "MainThread" and threads[("end", 1)] == "MainThread"
    for events in (seq_events, ovl_events):  # the run's first and last hooks
        assert events[0][:2] == ("start", 1) and events[-1][:2] == ("run-end", 3)


@pytest.mark.parametrize("overlap", [False, True])
def test_round_end_errors_propagate(overlap: bool) -> None:
    with pytest.raises(RuntimeError, match="evaluation of round 1 failed"):
        _run_rounds_recording(overlap=overlap, fail_at=1)


def test_records_of_matches_the_typed_record_properties() -> None:
    from flwr.app import Array

    from strategies.validation import records_of

    content = RecordDict(
        {
            "m1": MetricRecord({"a": 1.0}),
            "arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
            "cfg": ConfigRecord({"x": "y"}),
            "m2": MetricRecord({"b": 2}),
        }
    )
    for kind, prop in (
        (ArrayRecord, "array_records"),
        (MetricRecord, "metric_records"),
        (ConfigRecord, "config_records"),
    ):
        got = records_of(content, kind)
        assert [id(r) for r in got] == [id(r) for r in getattr(content, prop).values()]
    assert records_of(RecordDict(), MetricRecord) == []
