"""Personalised methods (``personalization.method``): what travels, what stays, the ADMM and FedRep schedules,
per-client evaluation, and client state across rounds and a kill-and-resume.

Most tests run ``fedeq simulate`` in this process over an in-process grid that keeps each node's
``context.state`` the way the Ray engine does (:class:`~fedeq.engines.ray.node_states.NodeStates`); one test
checks that the Ray engine gives the same numbers."""

from __future__ import annotations

import pickle
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict

from fedeq.cli.main import main
from fedeq.config import load_config
from fedeq.data import ClientData, load_client_data
from fedeq.models import build_model
from fedeq.personal import LocalJob, PersonalState, get_method, personal_keys, personal_summary, select
from fedeq.results.checkpoint import checkpoint_round, load_checkpoint
from fedeq.train import evaluate
from tests.inprocess_engine import NODE_ID_OFFSET, SIGNAL_AT, TRAFFIC, registered, simulate_cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
PERSONAL = [
    "engine=personal_local", "num_clients=6", "clients_per_round=3", "eval.budgets=[1]", "model.hidden=16",
    "data.partition=pathological", "data.labels_per_client=2", "data.client_test_fraction=0.25",
    "train.batch_size=64",
]  # fmt: skip


@pytest.fixture(autouse=True)
def personal_engine():  # type: ignore[no-untyped-def]
    with registered("personal_local"):
        yield


def _model(name: str = "mlp_deq", **over: Any) -> torch.nn.Module:
    cfg = load_config(QUICK, ["model.hidden=8", *(f"{k}={v}" for k, v in over.items())])
    shape = (1, 8, 8) if name == "conv_deq" else (64,)
    return build_model(name, shape, 10, cfg.model)


# ------------------------------------------------------------------------------------------- the split


def test_the_personal_part_is_the_classifier_unless_named() -> None:
    assert personal_keys(_model("mlp_deq")) == {"head.weight", "head.bias"}
    assert personal_keys(_model("explicit")) == {"head.weight", "head.bias"}
    assert personal_keys(_model("conv_deq")) == {"head.7.weight", "head.7.bias"}
    assert personal_keys(_model("mlp_deq"), ["inject"]) == {"inject.weight", "inject.bias"}
    with pytest.raises(ValueError, match=r"personalization.personal_modules: \['nope'\] are not modules"):
        personal_keys(_model(), ["nope"])
    with pytest.raises(ValueError, match="hold the whole model"):
        personal_keys(_model("explicit"), ["inject", "layers", "head"])


# ------------------------------------------------------------------------------ schedules, by hand


def _job(model: torch.nn.Module, settings: dict[str, Any], epochs: int, n: int = 24) -> LocalJob:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=gen).numpy()
    y = (torch.arange(n) % 3).numpy()
    data = ClientData(x, y, x[:0], y[:0], x[:6], y[:6])
    train = {"epochs": epochs, "lr": 0.1, "batch_size": n, "optimizer": "sgd", "weight_decay": 0.0}
    keys = personal_keys(model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from types import SimpleNamespace

    return LocalJob(model, data, train, keys, initial, SimpleNamespace(**settings), seed=5)


def test_admm_updates_match_a_hand_computation() -> None:
    """Two full-batch SGD steps (momentum 0.9) on ``CE + ⟨λ, θ_i − θ⟩ + ρ/2 ‖θ_i − θ‖²`` (head frozen), then
    ``λ ← λ + ρ (θ_i − θ)``, against the same steps written out with autograd."""
    torch.manual_seed(0)
    model = _model("explicit").double()
    rho, lr = 0.5, 0.1
    job = _job(model, {"head_epochs": 0, "rho": rho}, epochs=2)
    received = select(job.initial, job.personal, keep=False)
    shared = sorted(n for n, _ in model.named_parameters() if n not in job.personal)
    state = PersonalState(RecordDict())
    dual0 = {n: 0.1 * torch.randn_like(received[n]) for n in shared}
    state.put("dual", dual0)
    sent, stats = get_method("fedeq").train(job, received, state)

    ref = _model("explicit").double()
    ref.load_state_dict(job.initial)
    x, y = torch.as_tensor(job.data.x_train, dtype=torch.float64), torch.as_tensor(job.data.y_train)
    params = dict(ref.named_parameters())
    velocity = {n: torch.zeros_like(params[n]) for n in shared}  # train.optimizer=sgd: momentum 0.9
    for _ in range(2):
        loss = F.cross_entropy(ref(x).logits, y)
        for n in shared:
            gap = params[n] - received[n]
            loss = loss + (dual0[n] * gap).sum() + 0.5 * rho * gap.pow(2).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in shared])
        with torch.no_grad():
            for n, g in zip(shared, grads, strict=True):
                velocity[n] = 0.9 * velocity[n] + g
                params[n] -= lr * velocity[n]
    for n in shared:
        torch.testing.assert_close(sent[n], params[n].detach(), rtol=0, atol=1e-12)
        expected_dual = dual0[n] + rho * (params[n].detach() - received[n])
        torch.testing.assert_close(state.get("dual")[n], expected_dual, rtol=0, atol=1e-12)  # type: ignore[index]
    head = state.get("head")
    assert head is not None and set(head) == job.personal and not set(sent) & job.personal
    for k in job.personal:  # the head was frozen in the shared phase and head_epochs=0
        torch.testing.assert_close(head[k], job.initial[k], rtol=0, atol=0)
    assert stats.steps == 2


def test_fedrep_trains_the_head_first_then_the_body() -> None:
    torch.manual_seed(0)
    model = _model("mlp_deq").double()
    job = _job(model, {"head_epochs": 2}, epochs=0)
    received = select(job.initial, job.personal, keep=False)
    state = PersonalState(RecordDict())
    sent, stats = get_method("fedrep").train(job, received, state)
    assert stats.steps == 2  # the head phase alone: no body epochs
    params = {n for n, _ in model.named_parameters()}
    for k, v in sent.items():  # the body's parameters did not move during the head phase
        if k in params:  # (the spectral-norm buffer scale.u follows every training forward)
            torch.testing.assert_close(v, received[k], rtol=0, atol=0)
    head = state.get("head")
    assert head is not None and any(not torch.equal(head[k], job.initial[k]) for k in job.personal)

    calls: list[tuple[int, frozenset[str] | None]] = []
    real_fit = LocalJob.fit

    def spy(self, epochs, seed_offset, trainable=None, **kw):  # type: ignore[no-untyped-def]
        calls.append((epochs, trainable))
        return real_fit(self, epochs, seed_offset, trainable, **kw)

    job = _job(_model("mlp_deq").double(), {"head_epochs": 3}, epochs=2)
    LocalJob.fit = spy  # type: ignore[method-assign]
    try:
        get_method("fedrep").train(
            job, select(job.initial, job.personal, keep=False), PersonalState(RecordDict())
        )
    finally:
        LocalJob.fit = real_fit  # type: ignore[method-assign]
    body = frozenset(n for n, _ in job.model.named_parameters() if n not in job.personal)
    assert calls == [(3, frozenset({"head.weight", "head.bias"})), (2, body)]
    assert all(p.requires_grad for p in job.model.parameters())  # restored after the call


def test_personal_summary_mean_and_worst_ten_percent() -> None:
    accs = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.6, 0.4, 0.2, 1.0, 0.95]
    out = personal_summary(accs)
    assert out["personal_acc"] == pytest.approx(sum(accs) / 11)
    assert out["personal_acc_worst10"] == pytest.approx((0.1 + 0.2) / 2)  # ceil(1.1) = 2 clients
    assert personal_summary([0.5])["personal_acc_worst10"] == 0.5
    assert np.isnan(personal_summary([])["personal_acc"])


def test_without_a_client_test_split_the_split_is_the_one_runs_always_had() -> None:
    """``client_test_fraction=0``: validation = the first ``round(f·n)`` of the seeded permutation, training
    the rest (the split of every earlier fedeq run, written out here)."""
    from fedeq.data.clients import _cfg_partitions

    cfg = load_config(QUICK, ["data.val_fraction=0.2"])
    splits, parts = _cfg_partitions(cfg.data, 4, 0)
    for pid in range(4):
        idx = parts[pid]
        n = len(idx)
        perm = np.random.default_rng(pid).permutation(n)
        n_val = min(max(1, round(n * 0.2)), n - 1)
        d = load_client_data(cfg.data, pid, 4, 0)
        np.testing.assert_array_equal(d.y_val, splits.y_train[np.sort(idx[perm[:n_val]])])
        np.testing.assert_array_equal(d.x_train, splits.x_train[np.sort(idx[perm[n_val:]])])
        assert d.x_test is None


def test_a_deadline_covers_the_whole_call_and_fedprox_only_the_sent_phase() -> None:
    torch.manual_seed(0)
    model = _model("mlp_deq").double()
    job = _job(model, {"head_epochs": 5}, epochs=5, n=24)
    job.train.update(deq={"solver": "fixed_point", "f_max_iter": 2, "backward": "jfb", "b_max_iter": 2})
    job.train.update(
        sim_budget_s=20.0, sim_cost_s=1.0 / 24, proximal_mu=0.5
    )  # a step costs 3 s (3 evaluations)
    seen: list[dict[str, Any]] = []
    import fedeq.personal.methods as methods

    real = methods.train_local

    def spy(model, x, y, **options):  # type: ignore[no-untyped-def]
        seen.append(options)
        return real(model, x, y, **options)

    methods.train_local = spy  # type: ignore[assignment]
    try:
        _, stats = get_method("fedrep").train(
            job, select(job.initial, job.personal, keep=False), PersonalState(RecordDict())
        )
    finally:
        methods.train_local = real  # type: ignore[assignment]
    assert [o["proximal_mu"] for o in seen] == [0.0, 0.5]  # the head phase has no proximal term
    assert seen[0]["sim_budget_s"] == 20.0 and seen[1]["sim_budget_s"] == pytest.approx(5.0)
    assert stats.steps == 5 + 2  # 5 head steps (15 s), then the body until the call's 20 s are used


def test_a_frozen_parameter_stays_frozen() -> None:
    from fedeq.personal import trainable_only

    model = _model("explicit")
    model.inject.weight.requires_grad_(False)
    with trainable_only(model, None) as names:
        assert "inject.weight" not in names and model.head.weight.requires_grad
    assert not model.inject.weight.requires_grad and model.head.weight.requires_grad


def test_the_client_test_split_is_held_out_of_training_and_validation() -> None:
    cfg = load_config(QUICK, ["data.client_test_fraction=0.25", "data.val_fraction=0.1"])
    plain = load_config(QUICK, [])
    for pid in range(4):
        d = load_client_data(cfg.data, pid, 4, 0)
        n = d.num_train + d.num_val + len(d.y_test)  # type: ignore[arg-type]
        assert len(d.y_test) == round(0.25 * n) and d.num_val == round(0.1 * n)  # type: ignore[arg-type]
        rows = {r.tobytes() for r in d.x_train} | {r.tobytes() for r in d.x_val}
        assert not rows & {r.tobytes() for r in d.x_test}  # type: ignore[union-attr]
        p = load_client_data(plain.data, pid, 4, 0)
        assert p.x_test is None and p.num_train + p.num_val == n  # the same partition without a test split


# ------------------------------------------------------------------------------------- simulations


@pytest.mark.parametrize("method", ["fedeq", "fedrep", "fedper", "ditto", "local", "finetune"])
def test_personal_state_never_leaves_the_client(method: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = simulate_cli(
        capsys, str(QUICK), *PERSONAL, "rounds=2", f"personalization.method={method}",
        f"output_dir={tmp_path}", "run_name=r", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    model = _model("mlp_deq", **{"model.hidden": 16})
    head = personal_keys(model)
    whole = set(model.state_dict())
    shares = get_method(method).shares
    expected = {"body": whole - head, "model": whole, "nothing": set()}[shares]
    for _, message in TRAFFIC:
        content = message.content
        assert set(content.array_records) <= {"arrays"}  # no other tensors ride along
        arrays = content.array_records.get("arrays")
        if arrays is not None:
            assert set(arrays) == expected, (method, sorted(arrays))
    rounds = pd.read_csv(tmp_path / "r" / "rounds.csv")
    shared_bytes = (
        ArrayRecord(select(model.state_dict(), frozenset(expected))).count_bytes() if expected else 0
    )
    assert (rounds["bytes_up"] == rounds["clients_ok"] * shared_bytes).all()
    assert rounds["personal_clients"].eq(6).all() and rounds["personal_acc"].between(0, 1).all()
    assert ("test_acc" in rounds) == (shares == "model") == ("global_acc_clients" in rounds)
    assert (tmp_path / "r" / "personal_accuracy.png").is_file()
    assert "personalised accuracy   final mean" in out


def test_state_survives_rounds_and_a_kill_and_resume_bit_identically(tmp_path, capsys):  # type: ignore[no-untyped-def]
    base = [
        str(QUICK),
        *PERSONAL,
        "rounds=4",
        "personalization.method=fedeq",
        f"output_dir={tmp_path}",
        "--quiet",
    ]
    assert simulate_cli(capsys, *base, "run_name=whole")[0] == 0
    SIGNAL_AT.update(round=3, signum=signal.SIGTERM)
    code, _, err = simulate_cli(capsys, *base, "run_name=killed")
    killed = tmp_path / "killed"
    assert code == 143 and checkpoint_round(killed) == 2, err
    assert simulate_cli(capsys, "--resume", str(killed), "--quiet")[0] == 0
    for name in ("rounds.csv", "clients.csv"):
        drop = ["wall_s"] if name == "rounds.csv" else ["compute_s", "compute_cpu_s"]
        a = pd.read_csv(tmp_path / "whole" / name).drop(columns=drop)
        b = pd.read_csv(killed / name).drop(columns=drop)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    states = [load_checkpoint(p)["node_states"]["states"] for p in (tmp_path / "whole", killed)]
    assert states[0].keys() == states[1].keys() and len(states[0]) >= 3
    for node in states[0]:
        a, b = (PersonalState(pickle.loads(s[node])) for s in states)
        assert sorted(a.names()) == ["dual", "head"]
        for name in ("dual", "head"):
            for key, value in a.get(name).items():  # type: ignore[union-attr]
                assert torch.equal(value, b.get(name)[key])  # type: ignore[index]


def test_evaluate_rows_hold_each_clients_personalised_accuracy(tmp_path, capsys):  # type: ignore[no-untyped-def]
    """The last round's ``clients.csv`` evaluate rows, recomputed by hand from the run's files: the final
    shared part (``global_model.pt``) with each client's head from the checkpoint, on its test split."""
    args = [str(QUICK), *PERSONAL, "rounds=2", "personalization.method=fedrep", f"output_dir={tmp_path}"]
    assert simulate_cli(capsys, *args, "run_name=r", "--quiet")[0] == 0
    run = tmp_path / "r"
    cfg = load_config(run / "config.yaml")
    clients = pd.read_csv(run / "clients.csv")
    last = clients[(clients["call"] == "evaluate") & (clients["round"] == 2)].set_index("partition")
    assert len(last) == 6 and last["train_loss"].isna().all()
    shared = torch.load(run / "global_model.pt")
    heads = load_checkpoint(run)["node_states"]["states"]
    model = _model("mlp_deq", **{"model.hidden": 16})
    tiers = {t.name: t for t in cfg.devices.tiers}
    rounds = pd.read_csv(run / "rounds.csv")
    accs = []
    for pid in range(6):
        data = load_client_data(cfg.data, pid, 6, cfg.seed)
        stored = heads.get(NODE_ID_OFFSET + pid)
        head = PersonalState(pickle.loads(stored)).get("head") if stored else None
        initial = _initial_head(cfg) if head is None else head
        model.load_state_dict({**shared, **initial})
        tier = tiers[last.loc[pid, "tier"]]
        settings = {"solver": tier.solver, "f_max_iter": tier.f_max_iter, "tol": cfg.model.tol}
        st = evaluate(model, data.x_test, data.y_test, **settings, stop_mode=cfg.model.stop_mode)
        assert last.loc[pid, "test_examples"] == len(data.y_test)  # type: ignore[arg-type]
        assert last.loc[pid, "personal_acc"] == pytest.approx(st.accuracy, abs=1e-12)
        accs.append(st.accuracy)
    assert rounds["personal_acc"].iloc[-1] == pytest.approx(float(np.mean(accs)), abs=1e-12)
    assert rounds["personal_acc_worst10"].iloc[-1] == pytest.approx(min(accs), abs=1e-12)


def _initial_head(cfg: Any) -> dict[str, torch.Tensor]:
    from clients.personal_app import initial_state
    from clients.run_setup import RunSetup

    state = initial_state(RunSetup(cfg))
    return {k: v for k, v in state.items() if k.startswith("head.")}


def test_bad_personalization_config_exits_2_naming_the_key(tmp_path, capsys):  # type: ignore[no-untyped-def]
    base = [str(QUICK), *PERSONAL, f"output_dir={tmp_path}", "--quiet"]
    for override, key in [
        ("personalization.method=fedavg", "personalization.method"),
        ("data.client_test_fraction=0", "data.client_test_fraction"),
        ("personalization.personal_modules=[nope]", "personalization.personal_modules"),
        ("aggregation=async", "aggregation"),
        ("personalization.rho=0", "personalization.rho"),
        ("strategy.kwargs.quality=server_val", "personalization.method"),
    ]:
        extra = [] if "method" in override else ["personalization.method=fedeq"]
        extra += ["data.server_val_fraction=0.1"] if "server_val" in override else []
        code, _, err = simulate_cli(capsys, *base, *extra, override)
        assert code == 2 and err.startswith(f"fedeq: error: {key}:"), err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_ray_engine_keeps_client_state_like_the_devices(tmp_path, capsys):  # type: ignore[no-untyped-def]
    """engine=ray (states carried by the grid between actor calls) gives the in-process numbers."""
    common = [str(QUICK), *PERSONAL[1:], "rounds=3", "personalization.method=fedeq", f"output_dir={tmp_path}"]
    assert simulate_cli(capsys, *common, "engine=personal_local", "run_name=local", "--quiet")[0] == 0
    code, _, err = simulate_cli(capsys, *common, "engine=ray", "run_name=ray", "--quiet")
    assert code == 0, err
    cols = ["round", "personal_acc", "personal_acc_worst10", "bytes_up"]
    a, b = (pd.read_csv(tmp_path / n / "rounds.csv")[cols] for n in ("local", "ray"))
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    assert len(load_checkpoint(tmp_path / "ray")["node_states"]["states"]) >= 3


@pytest.mark.slow
def test_flowers_engine_keeps_client_state_in_the_nodes_context(tmp_path, capsys):  # type: ignore[no-untyped-def]
    """engine=flower: the ClientApp's ``context.state`` lives in Flower's node contexts (as on a SuperNode).
    With local training only and every client in every round, a client's model after round ``k`` has ``k``
    rounds of training behind it only if its state survived: the accuracies match the in-process engine's,
    round by round."""
    common = [
        str(QUICK), *PERSONAL[1:], "rounds=3", "clients_per_round=6", "model.name=explicit",
        "personalization.method=local",
        f"output_dir={tmp_path}", "--quiet",
    ]  # fmt: skip
    assert simulate_cli(capsys, *common, "engine=personal_local", "run_name=local")[0] == 0
    code, _, err = simulate_cli(capsys, *common, "engine=flower", "run_name=flower")
    assert code == 0, err
    cols = ["round", "personal_acc", "personal_acc_worst10"]
    a, b = (pd.read_csv(tmp_path / n / "rounds.csv")[cols] for n in ("local", "flower"))
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)
    assert a["personal_acc"].iloc[-1] > a["personal_acc"].iloc[0]  # the models kept learning


def _activation_bytes(model: torch.nn.Module, **deq: Any) -> float:
    job = _job(model, {}, epochs=1)
    job.train["deq"] = deq
    job.fit(1, 0)
    return job.activation_bytes


def test_training_memory_counts_activations_not_weights() -> None:
    """The activations saved per step grow with the depth of an explicit network and with the unrolled
    steps of a DEQ's phantom gradient, and stay flat with the implicit gradient (FeDEQ's memory argument)."""
    from fedeq.personal.memory import training_memory

    torch.manual_seed(0)
    from fedeq.models.explicit import ExplicitMLP

    explicit = [_activation_bytes(ExplicitMLP(64, 10, hidden=8, depth=d).double()) for d in (2, 4)]
    assert explicit[1] > explicit[0] > 0
    deq = _model("mlp_deq").double()
    ift = [_activation_bytes(deq, solver="fixed_point", f_max_iter=k, backward="ift") for k in (4, 16)]
    assert ift[0] == ift[1] > 0
    phantom = [
        _activation_bytes(deq, solver="fixed_point", f_max_iter=k, backward="phantom", b_max_iter=k)
        for k in (2, 6)
    ]  # noqa: E501
    assert phantom[1] > phantom[0]
    weights = sum(p.numel() * 8 for p in deq.parameters())  # float64
    assert training_memory(deq, "adam", 100.0) == weights * 4 + 100


def test_a_sweep_reports_personalised_accuracy_bytes_and_memory(tmp_path, capsys):  # type: ignore[no-untyped-def]
    out = tmp_path / "sweep"
    args = [
        str(QUICK),
        *PERSONAL,
        "rounds=2",
        "--grid",
        "personalization.method=fedrep,ditto",
        "--out",
        str(out),
    ]
    assert main(["sweep", *args]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert re.search(
        r"method=fedrep, seed=0: final n/a, best n/a, personalised 0\.\d{4} \(worst 10% ", printed
    )
    summary = pd.read_csv(out / "summary.csv").set_index("personalization.method")
    sweep = pd.read_csv(out / "sweep.csv").set_index("personalization.method")
    for method in ("fedrep", "ditto"):
        rounds = pd.read_csv(out / sweep.loc[method, "run_dir"] / "rounds.csv")
        last = rounds.iloc[-1]
        row = summary.loc[method]
        assert row["final_personal_acc_mean"] == pytest.approx(last["personal_acc"])
        assert row["final_personal_worst10_mean"] == pytest.approx(last["personal_acc_worst10"])
        assert row["bytes_per_round_mean"] == pytest.approx(
            (rounds["bytes_up"] + rounds["bytes_down"]).mean()
        )
        assert row["peak_train_mem_mb_mean"] == pytest.approx(rounds["train_mem_peak_bytes"].max() / 1e6)
    assert np.isnan(summary.loc["fedrep", "final_global_acc_clients_mean"])
    assert summary.loc["ditto", "final_global_acc_clients_mean"] > 0
    assert summary.loc["ditto", "bytes_per_round_mean"] > summary.loc["fedrep", "bytes_per_round_mean"]


def test_the_dry_run_says_what_travels_and_that_cohorts_are_off(capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["simulate", "personalization.method=fedrep", "data.client_test_fraction=0.2", "--dry-run"])
    out = capsys.readouterr().out
    model = _model("mlp_deq", **{"model.hidden": 64})
    state = model.state_dict()
    whole = ArrayRecord(state).count_bytes()  # the bytes_up / bytes_down of a run count the same way
    shared = ArrayRecord(select(state, personal_keys(model), keep=False)).count_bytes()
    assert code == 0 and "federated evaluation on 100% of the clients" in out
    assert f"personal  fedrep: {shared:,} of the {whole:,} bytes travel each way" in out
    assert "not vectorized, one client per call: personalised training" in out


def test_fedeqs_claims_at_small_scale(tmp_path, capsys):  # type: ignore[no-untyped-def]
    """FeDEQ's claims on a pathological split (two labels per client) at toy scale: its personal models
    are far better on the clients' own data than one global model, and its messages (a weight-tied
    equilibrium layer) are smaller than FedRep's with an explicit three-layer body of the same width. (Its
    accuracy against the explicit baselines is a study, docs/personalization.md, not a 4-round check.)"""
    base = [str(QUICK), *PERSONAL, "rounds=4", "model.hidden=32", f"output_dir={tmp_path}", "--quiet"]
    runs = {
        "fedeq": ["personalization.method=fedeq", "model.name=mlp_deq"],
        "fedrep": ["personalization.method=fedrep", "model.name=explicit"],
        "finetune": ["personalization.method=finetune", "model.name=explicit"],
    }
    rounds = {}
    for name, extra in runs.items():
        assert simulate_cli(capsys, *base, *extra, f"run_name={name}")[0] == 0
        rounds[name] = pd.read_csv(tmp_path / name / "rounds.csv").iloc[-1]
    assert rounds["fedeq"]["personal_acc"] > rounds["finetune"]["global_acc_clients"] + 0.2
    per_update = {n: r["bytes_up"] / r["clients_ok"] for n, r in rounds.items()}
    assert per_update["fedeq"] < per_update["fedrep"] < per_update["finetune"]
