"""Cohort training: many clients in one vectorized computation give each client exactly what it gets alone.

The reference is the per-client path (:func:`fedeq.train.train_local` and the ClientApp's train handler):
parameters agree to 1e-10 in float64 and within float32 rounding in float32, for every solver, every
backward mode, the families that vectorize, FedProx and the partial deadline; options that cannot be
vectorized are refused with a reason, and the message handler falls back to the ClientApp.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import clients.client_app as client_app
import clients.cohort_app as cohort_app
import clients.run_setup as run_setup
from clients.cohort_app import train_cohort_messages
from fedeq.config import RUN_CONFIG_KEY, load_config, to_yaml
from fedeq.devices.faults import exception_reply
from fedeq.engines.ray.cohorts import auto_size, client_bytes, cohort_cap, split_cohorts
from fedeq.models import build_model
from fedeq.train import evaluate, train_local
from fedeq.train.adversarial import AdversarialConfig
from fedeq.train.cohort import CohortClient, cohort_problem, evaluate_cohort, train_cohort
from fedeq.train.cohort_model import StackedModel
from tests.flwr_helpers import task_identity

SIZES = (40, 23, 64, 7)  # different numbers of batches: the short clients stop early
STATS = ("loss", "fp_residual", "nfe_fwd", "nfe_bwd", "steps", "samples_processed", "num_examples")


def _clients(model: torch.nn.Module, dtype: torch.dtype, mus=(0.0,) * 4, budgets=(None,) * 4):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(SIZES):
        x = torch.rand(n, 1, 8, 8, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (n,), generator=gen)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out.append(CohortClient(x, y, state, seed=100 + i, proximal_mu=mus[i], sim_budget_s=budgets[i]))
    return out


def _compare(name: str, dtype: torch.dtype, deq: dict, tol: float, **opts) -> float:  # type: ignore[no-untyped-def]
    """Train the same clients both ways; the largest parameter difference (stats checked too)."""
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10, None).to(dtype)
    mus, budgets = opts.pop("mus", (0.0,) * 4), opts.pop("budgets", (None,) * 4)
    cost = opts.pop("sim_cost_s", 0.0)
    clients = _clients(model, dtype, mus, budgets)
    options = {"epochs": 2, "lr": 0.01, "batch_size": 16, "deq": deq, **opts}
    stacked, stats = train_cohort(model, clients, sim_cost_s=cost, **options)
    worst = 0.0
    for i, c in enumerate(clients):
        alone = copy.deepcopy(model)
        alone.load_state_dict(c.state)
        ref = train_local(
            alone,
            c.x,
            c.y,
            seed=c.seed,
            proximal_mu=c.proximal_mu,
            sim_budget_s=c.sim_budget_s,
            sim_cost_s=cost,
            **options,
        )
        got = stacked.state_dict(i)
        for key, value in alone.state_dict().items():
            worst = max(worst, float((value - got[key]).abs().max()))
        for key in STATS:
            a, b = ref.as_dict()[key], stats[i].as_dict()[key]
            assert b == pytest.approx(a, rel=max(tol, 1e-12), abs=max(tol, 1e-12)), (name, deq, i, key)
    assert worst <= tol, (name, deq, worst)
    return worst


SOLVER_BACKWARDS = [
    (solver, backward)
    for solver in ("fixed_point", "anderson", "broyden")
    for backward in ("ift", "phantom", "jfb")
] + [("broyden", "broyden_reuse")]


@pytest.mark.parametrize(("solver", "backward"), SOLVER_BACKWARDS)
def test_every_solver_and_backward_mode_matches_the_per_client_path_in_float64(
    solver: str, backward: str
) -> None:
    deq = {"solver": solver, "backward": backward, "f_max_iter": 6, "b_max_iter": 5}
    if backward == "broyden_reuse":
        deq.update(reuse_updates=1, reuse_refine_iter=2)
    _compare("mlp_deq", torch.float64, deq, 1e-10)


@pytest.mark.parametrize("name", ["conv_deq", "explicit"])
def test_other_families_match_in_float64(name: str) -> None:
    _compare(name, torch.float64, {"solver": "anderson", "f_max_iter": 4, "b_max_iter": 3}, 1e-10)


def test_fedprox_sgd_weight_decay_and_per_client_mu_match() -> None:
    deq = {"solver": "anderson", "f_max_iter": 6, "b_max_iter": 5}
    _compare(
        "mlp_deq", torch.float64, deq, 1e-10, mus=(0.0, 0.5, 0.1, 1.0), optimizer="sgd", weight_decay=1e-3
    )
    _compare("mlp_deq", torch.float64, deq, 1e-10, mus=(0.2, 0.5, 0.1, 1.0), weight_decay=1e-3)


def test_partial_deadline_stops_each_client_where_it_stops_alone() -> None:
    deq = {"solver": "anderson", "f_max_iter": 6, "b_max_iter": 5}
    # 16 samples x ~10 evaluations x 1e-3 s = ~0.16 s per step: budgets stop the clients after 1, 2, none, 1
    _compare("mlp_deq", torch.float64, deq, 1e-10, budgets=(0.1, 0.3, None, 0.01), sim_cost_s=1e-3)


def test_float32_agrees_within_rounding() -> None:
    _compare("mlp_deq", torch.float32, {"solver": "anderson", "f_max_iter": 8, "b_max_iter": 8}, 1e-5)


def test_buffers_updated_in_place_stay_per_client() -> None:
    """mlp_deq's spectral-norm vector is a buffer each training forward updates: each client keeps its own."""
    torch.manual_seed(0)
    model = build_model("mlp_deq", (1, 8, 8), 10, None).double()
    clients = _clients(model, torch.float64)
    stacked, _ = train_cohort(model, clients, epochs=1, batch_size=16)
    vectors = [stacked.state_dict(i)["scale.u"] for i in range(len(clients))]
    assert not torch.equal(vectors[0], vectors[1])
    alone = copy.deepcopy(model)
    alone.load_state_dict(clients[1].state)
    train_local(alone, clients[1].x, clients[1].y, seed=clients[1].seed, epochs=1, batch_size=16)
    assert torch.allclose(alone.state_dict()["scale.u"], vectors[1], atol=1e-12)


def test_evaluate_cohort_matches_evaluate() -> None:
    torch.manual_seed(0)
    model = build_model("mlp_deq", (1, 8, 8), 10, None).double()
    clients = _clients(model, torch.float64)
    stacked = StackedModel(model, [c.state for c in clients], torch.device("cpu"))
    sets = [(c.x, c.y) for c in clients] + [(clients[0].x[:0], clients[0].y[:0])]
    stacked = StackedModel(model, [c.state for c in clients] + [clients[0].state], torch.device("cpu"))
    got = evaluate_cohort(stacked, sets, batch_size=16, f_max_iter=5)
    for (x, y), st in zip(sets[:-1], got, strict=False):
        ref = evaluate(model, x, y, batch_size=16, f_max_iter=5)
        for key in ("loss", "accuracy", "fp_residual", "nfe_fwd", "num_examples"):
            assert getattr(st, key) == pytest.approx(getattr(ref, key), rel=1e-10), key
    assert got[-1].num_examples == 0


def test_options_that_cannot_be_vectorized_are_named() -> None:
    model = build_model("mlp_deq", (1, 8, 8), 10, None)
    assert cohort_problem(model) is None
    assert "jac_reg" in cohort_problem(model, jac_reg=0.1)
    assert "randomize_budget" in cohort_problem(model, randomize_budget=True)
    assert "adversarial" in cohort_problem(model, adversarial=AdversarialConfig())
    assert "reuse_opa_every" in cohort_problem(model, deq={"reuse_opa_every": 5})
    tied = build_model("tied", (1, 8, 8), 10, None)
    assert "supports_cohorts" in cohort_problem(tied)
    with pytest.raises(ValueError, match="cannot train as a cohort: Jacobian"):
        train_cohort(model, _clients(model, torch.float32)[:1], jac_reg=0.1)


def test_cohort_sizes() -> None:
    assert split_cohorts(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert auto_size(100, 2, 512) == 50 and auto_size(100, 3, 20) == 20 and auto_size(1, 4, 9) == 1
    assert auto_size(25, 0.5, 512) == 25 and auto_size(25, 1.2, 512) == 13  # ceil(share) cohorts
    need = client_bytes(10_000, 64, 32, 64 * 10, 30)
    assert need == 4 * (6 * 10_000 + 32 * 34 * 64 + 640)
    assert cohort_cap(need, 1, memory_mb=need * 40 / 2**20) == 10  # a quarter of 40 clients' worth


# ---------------------------------------------------------------- the message handler


_START: dict[str, ArrayRecord] = {}


def _messages(cfg, pids):  # type: ignore[no-untyped-def]
    with task_identity():
        key = to_yaml(cfg)  # every message of a config starts from the same weights
        arrays = _START.setdefault(key, ArrayRecord(run_setup.model_for(cfg).state_dict()))
        out = []
        for pid in pids:
            config = ConfigRecord({RUN_CONFIG_KEY: to_yaml(cfg), "server-round": 2})
            message = Message(
                RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type="train"
            )
            nc = {"partition-id": pid, "num-partitions": cfg.num_clients, "tier": cfg.devices.tiers[0].name}
            context = Context(run_id=1, node_id=10 + pid, node_config=nc, state=RecordDict(), run_config={})
            out.append((message, context))
        return out


def _replies(cfg, pids, cohort: bool):  # type: ignore[no-untyped-def]
    pairs = _messages(cfg, pids)
    with task_identity():
        if cohort:
            return train_cohort_messages([m for m, _ in pairs], [c for _, c in pairs], client_app.app)
        return [_alone(m, c) for m, c in pairs]


def _alone(message: Message, context: Context) -> Message:
    """The ClientApp as the Ray worker runs it: an exception becomes the error reply."""
    try:
        return client_app.app(message, context)
    except Exception as err:  # noqa: BLE001
        return exception_reply(message, err)


def _summary(reply: Message) -> tuple:
    if reply.has_error():
        return ("error", reply.error.code, reply.error.reason)
    arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
    return ("ok", dict(reply.content.metric_records["metrics"]), arrays)


def test_message_handler_answers_like_the_client_app_with_offline_devices_and_faults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("fedeq.devices.faults.time.sleep", lambda s: None)  # the per-client hang
    cfg = load_config(
        "simulations/configs/quick.yaml",
        [
            "num_clients=12",
            "seed=2",
            "devices.tiers[0].availability=0.6",
            "faults.raise_p=0.15",
            "faults.nan_p=0.15",
            "faults.hang_p=0.15",
            "faults.hang_s=5",
            "ray.call_timeout_s=2",
        ],
    )
    pids = list(range(12))
    alone, together = _replies(cfg, pids, cohort=False), _replies(cfg, pids, cohort=True)
    kinds = set()
    for a, b in zip(alone, together, strict=True):
        sa, sb = _summary(a), _summary(b)
        kinds.add(sb[0] if sb[0] == "ok" else sb[2].split(":")[0])
        if sb[0] == "error" and sb[2].startswith("timeout"):  # hang_s > call_timeout_s: the grid's reply
            assert sa[0] == "ok" and sb[2] == "timeout: no reply within call_timeout_s=2"
            continue
        if sa[0] == "error":
            assert sb == sa
            continue
        assert sb[0] == "ok"
        for key, value in sa[1].items():
            if key not in ("compute-s", "compute-cpu-s"):
                assert sb[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        for key, value in sa[2].items():
            assert (value != value).all() == (sb[2][key] != sb[2][key]).all()  # NaN-poisoned alike
            assert abs(value - sb[2][key]).max(initial=0.0) <= 1e-4 or (value != value).any()
    assert {"ok", "offline", "InjectedFault", "timeout"} <= kinds
    poisoned = [_summary(b) for b in together if not b.has_error()]
    assert any(any((v != v).any() for v in s[2].values()) for s in poisoned)  # a nan fault


def test_message_handler_falls_back_with_one_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config("simulations/configs/quick.yaml", ["num_clients=4", "train.jac_reg=0.1"])
    monkeypatch.setattr(cohort_app, "_REPORTED", set())
    with caplog.at_level(logging.WARNING, logger="fedeq.cohort"):
        alone, together = _replies(cfg, [0, 1], cohort=False), _replies(cfg, [0, 1], cohort=True)
        _replies(cfg, [2, 3], cohort=True)
    lines = [r.getMessage() for r in caplog.records if "cohorts" in r.getMessage()]
    assert len(lines) == 1 and all("Jacobian regularization" in line for line in lines)
    for a, b in zip(alone, together, strict=True):
        assert _summary(a)[1]["train-loss"] == _summary(b)[1]["train-loss"]  # the same per-client code


def test_grouping_shares_a_pool_among_its_tiers_and_sends_the_costliest_first() -> None:
    from flwr.app import Message as Msg

    from fedeq.engines.ray.cohorts import group_calls

    with task_identity():
        train = [Msg(RecordDict(), dst_node_id=1, message_type="train") for _ in range(10)]
        evaluate = Msg(RecordDict(), dst_node_id=1, message_type="evaluate")
    tiers = [0, 1] * 5 + [1]
    calls = group_calls([*train, evaluate], tiers, "auto", [0, 0], [2], [512, 512], costs=[2.0, 30.0])
    assert calls[0] == (1, [evaluate])  # one message per call
    # the actors go by work (5 x 30 vs 5 x 2): two cohorts for the costly tier, one for the cheap one,
    # the costliest sent first
    assert calls[1:] == [(1, train[1::2][:3]), (1, train[1::2][3:]), (0, train[0::2])]
    sizes = [len(g) for _, g in group_calls(train, tiers[:10], 2, [0, 0], [2], [512, 512])]
    assert sizes == [2, 2, 2, 2, 1, 1]  # equal costs: the larger cohorts first
    alone = group_calls(train, tiers[:10], 1, [0, 0], [2], [512, 512])
    assert [g for _, g in alone] == [[m] for m in train]
