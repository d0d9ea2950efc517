"""Regulating the DEQ dynamics (Yang et al., ICML 2023): random intermediate states, entropy-reducing input
updates and the adaptive (BPDA) attack through them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fedeq.cli.config_args import check_model
from fedeq.config import ConfigError, load_config
from fedeq.deq import solve
from fedeq.models import MLPDEQ, build_model
from fedeq.models.parts import entropy
from fedeq.robust import AttackConfig, bpda_attack, input_gradient
from fedeq.train import (
    AdversarialConfig,
    EntropyDefense,
    RandomIntermediate,
    adversarial_step,
    check_intermediate_states,
    entropy_defense_fn,
    entropy_reduced_inputs,
    intermediate_forward,
)

DEQ = {"solver": "anderson", "f_max_iter": 8, "b_max_iter": 8, "tol": 1e-9}


@pytest.fixture()
def model() -> MLPDEQ:
    torch.manual_seed(0)
    return MLPDEQ(12, 4, hidden=10).double()


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(6, 12, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])


def _manual(model: MLPDEQ, x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's forward: k solver steps without a graph, one full step, five steps damped by 0.5."""
    p = model.parts()
    c = p.inject(x)
    with torch.no_grad():
        z, _ = solve(lambda v: p.cell(v, c), p.z0(c), "anderson", k, 1e-9, "rel")
    z = p.cell(z, c)
    for _ in range(5):
        z = 0.5 * z + 0.5 * p.cell(z, c)
    return p.readout(z)


@pytest.mark.parametrize("backward", ["ift", "jfb", "phantom"])
def test_intermediate_state_gradient_is_the_unrolled_one_whatever_the_tier_backward(model, batch, backward):
    x, y = batch
    out = intermediate_forward(model, x, 3, {**DEQ, "backward": backward})
    assert int(out.deq.forward.nfe.max()) <= 3 and out.deq.graph_evals == 6
    assert out.deq.backward.mode == "unrolled" and out.deq.backward.nfe == 6
    got = torch.autograd.grad(F.cross_entropy(out.logits, y), list(model.parameters()))
    ref = torch.autograd.grad(F.cross_entropy(_manual(model, x, 3), y), list(model.parameters()))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    # Control: the implicit gradient at the same (non-equilibrium) state is a different vector.
    ift = torch.autograd.grad(
        F.cross_entropy(model(x, **{**DEQ, "f_max_iter": 3}).logits, y), list(model.parameters())
    )
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, ift, strict=True))


@pytest.mark.parametrize(("mode", "steps", "calls"), [("pgd", 3, 4), ("trades", 2, 4), ("none", 1, 1)])
def test_every_forward_of_a_training_step_draws_its_own_state(model, batch, monkeypatch, mode, steps, calls):
    x, y = batch
    seen: list[int] = []
    original = RandomIntermediate.forward

    def spy(self, xs, **kw):
        out = original(self, xs, **kw)
        seen.append(self.last_k)
        return out

    monkeypatch.setattr(RandomIntermediate, "forward", spy)
    cfg = AdversarialConfig(mode, epsilon=0.1, steps=steps, intermediate_states=True)
    gen = torch.Generator().manual_seed(3)
    step = adversarial_step(model, x, y, cfg, DEQ, gen)
    step.loss.backward()
    assert len(seen) == calls and all(1 <= k <= DEQ["f_max_iter"] for k in seen)
    assert step.nfe_fwd >= 6 * (calls - 1)  # the attack's and the extra term's unrolled steps are charged
    # Same seed, same draws (determinism on the CPU).
    seen_first = list(seen)
    seen.clear()
    adversarial_step(model, x, y, cfg, DEQ, torch.Generator().manual_seed(3))
    assert seen == seen_first


def test_families_without_an_equilibrium_map_are_refused():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="equilibrium map"):
        check_intermediate_states(build_model("tied", (1, 8, 8), 10))
    for name in ("lyadeq", "potential_deq"):
        check_intermediate_states(build_model(name, (1, 8, 8), 10))
    # The CLI's check before any work (a ConfigError exits 2 with its one line).
    splits = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)  # the shapes check_model reads
    for name, ok in [("mondeq", False), ("tied", False), ("mlp_deq", True)]:
        cfg = load_config(None, [f"model.name={name}", "train.intermediate_states=true"])
        if ok:
            check_model(cfg, splits)
            continue
        with pytest.raises(ConfigError) as err:
            check_model(cfg, splits)
        assert err.value.key == "train.intermediate_states" and name in str(err.value)
        assert len(str(err.value).splitlines()) == 1


def test_entropy_updates_follow_the_staged_schedule_without_a_final_solve(model, batch):
    x, _ = batch
    calls = {"n": 0}
    cell = model.cell

    def counting(z, c):
        calls["n"] += 1
        return cell(z, c)

    model.deq.func = counting
    deq = {**DEQ, "solver": "fixed_point", "f_max_iter": 6, "tol": 1e-300}
    # Without input updates the prediction is the readout of the last of the K = 6 evaluations.
    x_same, logits = entropy_reduced_inputs(model, x, EntropyDefense(updates=0), deq)
    assert calls["n"] == 6 and torch.equal(x_same, x)
    p = model.parts()
    c = p.inject(x)
    z = p.z0(c)
    with torch.no_grad():
        for _ in range(6):
            z = cell(z, c)
        torch.testing.assert_close(logits, p.readout(z))
    # With R updates: T = 3 stages of 2 evaluations, R entropy gradients between consecutive stages.
    calls["n"] = 0
    defense = EntropyDefense(updates=4, step_size=0.05, radius=0.08)
    x_new, logits = entropy_reduced_inputs(model, x, defense, {**deq, "solver": "anderson"})
    assert calls["n"] == 6 + 2 * 4
    assert float((x_new - x).abs().max()) <= 0.08 + 1e-12 and x_new.min() >= 0 and x_new.max() <= 1
    with torch.no_grad():
        before = entropy(model(x, **{**deq, "solver": "anderson"}).logits).mean()
    assert float(entropy(logits).mean()) < float(before)


def test_bpda_steps_along_the_model_gradient_at_the_purified_input(model, batch):
    x, y = batch
    defense = EntropyDefense(updates=3, step_size=0.02, radius=0.05)
    run = entropy_defense_fn(model, defense, DEQ)
    cfg = AttackConfig("pgd", 0.1, steps=1, step_size=0.1, random_start=False, gradient="ift")
    res = bpda_attack(model, x, y, run, cfg, deq=DEQ)
    x_pur, logits0 = run(x)
    g, _, _ = input_gradient(model, x_pur, y, gradient="ift", deq=DEQ)
    stepped = (x + 0.1 * g.sign()).clamp(0, 1)
    moved = (res.x_adv - x).abs().amax(dim=1) > 0
    torch.testing.assert_close(res.x_adv[moved], stepped[moved])
    # Per sample the returned input has the larger defended loss of the two iterates.
    loss0 = F.cross_entropy(logits0, y, reduction="none")
    loss1 = F.cross_entropy(run(stepped)[1], y, reduction="none")
    torch.testing.assert_close(res.loss, torch.maximum(loss0, loss1))
    assert float((res.x_adv - x).abs().max()) <= 0.1 + 1e-12
