"""Attacks through DEQs, adversarial training and entropy-reducing input updates."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedeq.config import AdversarialMode, AttackNorm, ConfigError, load_config
from fedeq.data import load_dataset
from fedeq.models import MLPDEQ, ExplicitMLP
from fedeq.models.parts import entropy
from fedeq.robust import (
    NORMS,
    AttackConfig,
    fgsm,
    gradient_overrides,
    input_gradient,
    pgd,
    project,
    robust_accuracy,
)
from fedeq.train import (
    ADVERSARIAL_MODES,
    AdversarialConfig,
    EntropyDefense,
    adversarial_from_config,
    adversarial_step,
    entropy_reduced_inputs,
    train_local,
)

ROOT = Path(__file__).resolve().parents[1]
DEQ = {"solver": "anderson", "f_max_iter": 10, "b_max_iter": 10, "tol": 1e-5}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sp = load_dataset("digits")
    return (
        torch.from_numpy(sp.x_train.copy()),
        torch.from_numpy(sp.y_train.copy()),
        torch.from_numpy(sp.x_test.copy()),
        torch.from_numpy(sp.y_test.copy()),
    )


@pytest.fixture(scope="module")
def trained(digits) -> MLPDEQ:
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = MLPDEQ(64, 10, hidden=32)
    train_local(model, x, y, epochs=3, lr=0.01, batch_size=64, deq=DEQ, seed=0)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# projection and norm balls
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_project_is_the_ball_projection(norm: str) -> None:
    torch.manual_seed(0)
    eps = 0.3
    d = torch.randn(50, 1, 8, 8)
    p = project(d, eps, norm)
    size = p.flatten(1).abs().amax(1) if norm == "linf" else p.flatten(1).norm(dim=1)
    assert torch.all(size <= eps + 1e-6)
    small = 0.01 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(project(small, eps, norm), small)  # points inside stay put
    assert torch.allclose(project(p, eps, norm), p, atol=1e-7)  # idempotent


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_stays_in_ball_and_data_range(trained, digits, norm: str) -> None:
    _, _, x, y = digits
    x, y = x[:64], y[:64]
    eps = 0.15 if norm == "linf" else 1.0
    gen = torch.Generator().manual_seed(1)
    x_adv = pgd(trained, x, y, epsilon=eps, steps=5, norm=norm, deq=DEQ, generator=gen)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= eps + 1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert float(size.mean()) > 0.5 * eps  # it actually moved


@pytest.mark.parametrize("norm", NORMS)
def test_attack_loss_increases_with_epsilon(trained, digits, norm: str) -> None:
    _, _, x, y = digits
    x, y = x[:96], y[:96]
    radii = [0.0, 0.03, 0.06, 0.1, 0.15] if norm == "linf" else [0.0, 0.25, 0.5, 1.0, 1.5]
    losses = []
    for eps in radii:
        x_adv = pgd(trained, x, y, epsilon=eps, steps=10, norm=norm, random_start=False, deq=DEQ)
        with torch.no_grad():
            losses.append(float(F.cross_entropy(trained(x_adv, **DEQ).logits, y)))
    assert all(b >= a - 1e-6 for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] > 3 * losses[0], losses


def test_fgsm_is_one_step_pgd_without_random_start(trained, digits) -> None:
    _, _, x, y = digits
    x, y = x[:64], y[:64]
    a = fgsm(trained, x, y, epsilon=0.1, deq=DEQ)
    b = pgd(trained, x, y, epsilon=0.1, steps=1, step_size=0.1, random_start=False, deq=DEQ)
    assert torch.equal(a, b)
    g, _, _ = input_gradient(trained, x, y, gradient="ift", deq=DEQ)
    expected = (x + 0.1 * g.sign()).clamp(0, 1)
    assert torch.allclose(a, expected)


# ------------------------------------------------------------------------------------------------
# gradients through the DEQ
# ------------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_ift_input_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = MLPDEQ(12, 4, hidden=16, contraction=0.9).double().eval()
    tight = {"solver": "anderson", "f_max_iter": 200, "b_max_iter": 200, "tol": 1e-12, "stop_mode": "abs"}
    x = torch.rand(3, 12, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    g, _, _ = input_gradient(model, x, y, gradient="ift", deq=tight)
    h = 1e-6
    eye = torch.eye(12, dtype=torch.float64)
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(3):
            xp = x[i] + h * eye  # 12 perturbed copies of sample i, solved as one batch
            xm = x[i] - h * eye
            yi = y[i].repeat(12)
            lp = F.cross_entropy(model(xp, **tight).logits, yi, reduction="none")
            lm = F.cross_entropy(model(xm, **tight).logits, yi, reduction="none")
            fd[i] = (lp - lm) / (2 * h)
    assert torch.allclose(g, fd, rtol=1e-4, atol=1e-7)
    # the unrolled gradient with many undamped steps converges to the implicit one; one step (JFB) does not
    unrolled, _, _ = input_gradient(model, x, y, gradient="unrolled", deq={**tight, "f_max_iter": 200})
    assert _cos(unrolled, g) > 0.9999
    jfb, _, _ = input_gradient(model, x, y, gradient="jfb", deq=tight)
    assert _cos(jfb, g) < _cos(unrolled, g)


def test_gradient_overrides_map_to_backward_modes(trained) -> None:
    assert gradient_overrides(trained, "ift", DEQ)["backward"] == "ift"
    assert gradient_overrides(trained, "phantom", DEQ)["backward"] == "phantom"
    un = gradient_overrides(trained, "unrolled", DEQ)
    assert un["backward"] == "phantom" and un["phantom_damping"] == 1.0 and un["phantom_steps"] == 10
    assert gradient_overrides(trained, None, DEQ) == DEQ
    with pytest.raises(ValueError, match="gradient must be one of"):
        gradient_overrides(trained, "exact", DEQ)
    with pytest.raises(ValueError, match="attack norm"):
        AttackConfig(norm="l1").validate()


def test_attack_leaves_parameters_and_mode_alone(trained, digits) -> None:
    _, _, x, y = digits
    trained.train()
    trained.zero_grad(set_to_none=True)
    try:
        before = {k: v.clone() for k, v in trained.state_dict().items()}
        pgd(trained, x[:32], y[:32], epsilon=0.1, steps=2, deq=DEQ)
        assert trained.training
        assert all(p.grad is None for p in trained.parameters())
        assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    finally:
        trained.eval()


def test_robust_accuracy_on_deq_and_explicit_models(trained, digits) -> None:
    _, _, x, y = digits
    atk = AttackConfig("pgd", epsilon=0.1, steps=5)
    st = robust_accuracy(trained, x[:128], y[:128], atk, deq=DEQ)
    assert st.num_examples == 128
    assert 0.0 <= st.robust_acc < st.clean_acc <= 1.0
    assert st.robust_loss > st.clean_loss
    assert st.mean_perturbation == pytest.approx(0.1, abs=1e-5)
    explicit = ExplicitMLP(64, 10, hidden=16)
    ex = robust_accuracy(explicit, x[:64], y[:64], AttackConfig("fgsm", epsilon=0.1))
    assert ex.robust_loss >= ex.clean_loss


# ------------------------------------------------------------------------------------------------
# adversarial training
# ------------------------------------------------------------------------------------------------


def test_adversarial_training_raises_robust_accuracy(digits) -> None:
    x, y, xt, yt = digits
    x, y = x[:600], y[:600]
    deq = {"solver": "anderson", "f_max_iter": 8, "b_max_iter": 8, "tol": 1e-4}
    atk = AttackConfig("pgd", epsilon=0.1, steps=5)
    results = {}
    for name, adv in (("plain", None), ("pgd", AdversarialConfig("pgd", epsilon=0.1, steps=3))):
        torch.manual_seed(0)
        model = MLPDEQ(64, 10, hidden=32)
        stats = train_local(model, x, y, epochs=5, lr=0.01, batch_size=50, deq=deq, seed=0, adversarial=adv)
        results[name] = (robust_accuracy(model, xt[:200], yt[:200], atk, deq=deq), stats)
    plain, pgd_at = results["plain"][0], results["pgd"][0]
    assert pgd_at.robust_acc > plain.robust_acc + 0.1, (plain, pgd_at)
    assert pgd_at.clean_acc > 0.7
    # the attack's solver work is charged to the client
    assert results["pgd"][1].nfe_fwd > 2 * results["plain"][1].nfe_fwd


@pytest.mark.parametrize(
    "cfg",
    [
        AdversarialConfig("trades", epsilon=0.1, steps=2),
        AdversarialConfig("pgd", epsilon=0.1, steps=2, intermediate_states=True, norm="l2"),
        AdversarialConfig("none", intermediate_states=True),
        AdversarialConfig("pgd", epsilon=0.1, steps=3, attack="jiio"),
    ],
    ids=["trades", "pgd-intermediate-l2", "clean-intermediate", "jiio-at"],
)
def test_adversarial_modes_train(trained, digits, cfg: AdversarialConfig) -> None:
    x, y, _, _ = digits
    model = MLPDEQ(64, 10, hidden=32)
    model.load_state_dict(trained.state_dict())
    stats = train_local(model, x[:128], y[:128], epochs=1, batch_size=64, deq=DEQ, adversarial=cfg)
    assert stats.steps == 2 and torch.isfinite(torch.tensor(stats.loss))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters(), strict=True))


def test_intermediate_states_use_smaller_budgets(trained, digits) -> None:
    x, y, _, _ = digits
    cfg = AdversarialConfig("none", intermediate_states=True)
    gen = torch.Generator().manual_seed(0)
    used = {
        int(adversarial_step(trained, x[:8], y[:8], cfg, DEQ, gen).out.deq.settings.f_max_iter)
        for _ in range(30)
    }
    assert min(used) >= 1 and max(used) <= 10 and len(used) > 3


def test_entropy_reduction_lowers_entropy_within_radius(trained, digits) -> None:
    _, _, x, y = digits
    x = x[:64]
    defense = EntropyDefense(stages=2, updates=3, step_size=0.02)
    x_new, logits = entropy_reduced_inputs(trained, x, defense, DEQ)
    with torch.no_grad():
        before = entropy(trained(x, **DEQ).logits).mean()
    assert float(entropy(logits).mean()) < float(before)
    assert float((x_new - x).abs().max()) <= defense.bound + 1e-6
    assert x_new.min() >= 0 and x_new.max() <= 1


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


def test_config_keys_and_mapping() -> None:
    assert get_args(AdversarialMode) == ADVERSARIAL_MODES
    assert get_args(AttackNorm) == NORMS
    assert adversarial_from_config(load_config().train) is None
    cfg = load_config(
        None,
        [
            "train.adversarial=trades",
            "train.epsilon=0.2",
            "train.attack_steps=7",
            "train.attack_norm=l2",
            "train.trades_beta=3",
            "train.intermediate_states=true",
            "train.attack_step_size=0.05",
        ],
    )
    adv = adversarial_from_config(cfg.train)
    assert adv == AdversarialConfig("trades", 0.2, 7, 0.05, "l2", 3.0, True)
    for item, key in (
        ("train.adversarial=fgsm", "train.adversarial"),
        ("train.attack_norm=l1", "train.attack_norm"),
        ("train.attack_steps=0", "train.attack_steps"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, [item])
        assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.adversarial=pgd", "train.epsilon=0"])
    assert info.value.key == "train.epsilon" and "> 0" in str(info.value)


@pytest.mark.slow
def test_federated_adversarial_training_end_to_end(tmp_path: Path) -> None:
    from fedeq.engines.simulate import simulate

    cfg = load_config(
        ROOT / "simulations" / "configs" / "quick.yaml",
        ["train.adversarial=pgd", "train.attack_steps=2", "rounds=1", f"output_dir={tmp_path}"],
    )
    out = simulate(cfg, quiet=True)
    for name in ("config.yaml", "rounds.csv", "clients.csv", "summary.json"):
        assert (out / name).exists(), name
    assert "adversarial: pgd" in (out / "config.yaml").read_text()
    clients = pd.read_csv(out / "clients.csv")
    assert len(clients) == cfg.clients_per_round and (clients["status"] == "ok").all()
    # each step pays for the attack: (attack_steps + 1) forward passes at the tier's budget (plus 1 each)
    budgets = {t.name: t.f_max_iter for t in cfg.devices.tiers}
    assert (clients["nfe_fwd"] > clients["tier"].map(budgets) + 1).all(), clients[["tier", "nfe_fwd"]]
    rounds = pd.read_csv(out / "rounds.csv")
    assert len(rounds) == 1 and rounds["test_acc"].notna().all()
