"""LyaDEQ: a free DEQ cell made Lyapunov-stable by a projection on a learned convex V, an orthogonal layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedeq.deq import solve
from fedeq.models import MLPDEQ, LyaDEQ
from fedeq.robust import AttackConfig, robust_accuracy
from fedeq.train import AdversarialConfig, train_local


@pytest.fixture()
def model() -> LyaDEQ:
    torch.manual_seed(0)
    return LyaDEQ(20, 5, hidden=12, icnn_width=8).double()


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.rand(9, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _trajectory(
    model: LyaDEQ, ctx, z0: torch.Tensor, solver: str, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V at every state the solver evaluated, shape (steps, B); the solver's answer)."""
    points = []

    def f(z):
        points.append(z.clone())
        return model.cell(z, ctx)

    z, _ = solve(f, z0, solver, steps, 1e-300, "abs")
    return torch.stack([model.lyapunov(p, ctx) for p in points]), z


def test_lyapunov_function_decreases_at_every_step_and_every_start_reaches_the_equilibrium(model, x):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ctx = model.context(x)
        ends = []
        for scale in (0.0, 1.0, 5.0):
            z0 = scale * torch.randn(9, 12, generator=gen, dtype=torch.float64)
            V, _ = _trajectory(model, ctx, z0, "fixed_point", 40)
            assert float((V[1:] - V[:-1]).max()) <= 1e-12 * float(V.abs().max())
            assert bool((V[-1] < V[0]).all()) or scale == 0.0
            ends.append(solve(lambda z: model.cell(z, ctx), z0, "anderson", 200, 1e-13, "abs")[0])
        for z in ends:
            torch.testing.assert_close(z, ends[0], atol=1e-9, rtol=0)
            assert float(model.lyapunov_grad(z, ctx).norm(dim=1).max()) < 1e-9  # z* = argmin V
        # Negative control: a step far beyond the bound makes V go up, so the check above can fail.
        model.cell.step_scale = 40.0
        V_bad, _ = _trajectory(model, ctx, torch.zeros(9, 12, dtype=torch.float64), "fixed_point", 10)
        assert float((V_bad[1:] - V_bad[:-1]).max()) > 0


def test_projection_enforces_the_decay_condition_and_leaves_decaying_fields_alone(model, x):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ctx = model.context(x)
        cell = model.cell
        for scale in (0.1, 1.0, 4.0):
            z = scale * torch.randn(9, 12, generator=gen, dtype=torch.float64)
            g = model.lyapunov_grad(z, ctx)
            fs = cell.stable_field(z, ctx)
            decay = (g * fs).sum(dim=1) + cell.beta * g.pow(2).sum(dim=1)
            assert float(decay.max()) <= 1e-10
            # ||F_s|| <= (2γ + β) ||∇V||: the bound the step size is derived from.
            ratio = fs.norm(dim=1) / g.norm(dim=1)
            assert float(ratio.max()) <= 2 * cell.gamma + cell.beta + 1e-9
        # Where the scaled free field already decays V fast enough, the module does not touch it.
        cell.beta = 1e-6
        z = torch.randn(9, 12, generator=gen, dtype=torch.float64)
        g = model.lyapunov_grad(z, ctx)
        free = cell.free_field(z, ctx)
        free = cell.gamma * g.norm(dim=1, keepdim=True) * free / (1 + free.norm(dim=1, keepdim=True))
        keep = (g * free).sum(dim=1) + cell.beta * g.pow(2).sum(dim=1) <= 0
        assert bool(keep.any())
        torch.testing.assert_close(cell.stable_field(z, ctx)[keep], free[keep])


def test_free_cell_shapes_the_path_and_the_orthogonal_layer_survives_averaging(model, x):
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    # At the exact equilibrium (V's minimizer) the free cell gets no gradient; at an early state it does.
    model.zero_grad()
    out = model(
        x, solver="anderson", f_max_iter=200, tol=1e-13, stop_mode="abs", backward="ift", b_max_iter=200
    )
    F.cross_entropy(out.logits, y).backward()
    assert float(model.cell.free.weight.grad.abs().max()) < 1e-9
    assert float(model.inject.weight.grad.abs().max()) > 1e-4
    model.zero_grad()
    F.cross_entropy(model(x, solver="fixed_point", f_max_iter=2, backward="jfb").logits, y).backward()
    assert float(model.cell.free.weight.grad.abs().max()) > 1e-6
    # Q is orthogonal, also after averaging two clients' parameters (the Cayley parametrization).
    other = LyaDEQ(20, 5, hidden=12, icnn_width=8).double()
    avg = {k: (v + other.state_dict()[k]) / 2 for k, v in model.state_dict().items()}
    merged = LyaDEQ(20, 5, hidden=12, icnn_width=8).double()
    merged.load_state_dict(avg)
    for m in (model, merged):
        q = m.orth.weight.detach()
        torch.testing.assert_close(q @ q.T, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_lyadeq_robustness_against_the_plain_deq_on_digits():
    """Small version of ``simulations/robustness.py --study lyadeq`` (numbers in docs/robustness.md)."""
    from fedeq.data import load_dataset, to_tensors

    sp = load_dataset("digits")
    x, y = to_tensors(sp.x_train[:400], sp.y_train[:400])
    xt, yt = to_tensors(sp.x_test[:150], sp.y_test[:150])
    deq = {"solver": "anderson", "f_max_iter": 6, "b_max_iter": 6, "tol": 1e-4}
    fgsm = AttackConfig("fgsm", 0.1, gradient="ift")
    at = AdversarialConfig("pgd", epsilon=0.1, steps=2)
    acc = {}
    for name, make, adv in [
        ("deq", lambda: MLPDEQ(64, 10, hidden=24), None),
        ("lyadeq", lambda: LyaDEQ(64, 10, hidden=24), None),
        ("lyadeq+at", lambda: LyaDEQ(64, 10, hidden=24), at),
    ]:
        torch.manual_seed(0)
        m = make()
        train_local(m, x, y, epochs=3, lr=0.02, batch_size=32, deq=deq, adversarial=adv, seed=0)
        st = robust_accuracy(m, xt, yt, fgsm, deq=deq)
        acc[name] = (st.clean_acc, st.robust_acc)
    print(acc)
    assert all(clean > 0.7 for clean, _ in acc.values())  # every model learned
    assert acc["lyadeq+at"][1] > acc["lyadeq"][1] + 0.05  # adversarial training adds robustness
