"""MON-DEQ: unrolled gradients through the splitting map, and the default step sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedeq.deq import DEQSettings
from fedeq.deq.backward import phantom_unroll
from fedeq.models.mondeq import MonDEQ, splitting_map
from fedeq.models.mondeq.splitting import FB_ALPHA, SPLITTINGS, default_alpha, splitting_solve, tune_alpha
from fedeq.train import train_local

HIDDEN = 16
STEPS = {"pr": 1.0, "fb": FB_ALPHA}


@pytest.fixture(scope="module")
def trained():
    """A small MON-DEQ after six Adam steps on a synthetic 5-class problem (float64), with a test batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 20, generator=gen)
    y = (x @ torch.randn(20, 5, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = MonDEQ(20, 5, hidden=HIDDEN, solver="fixed_point", f_max_iter=30, b_max_iter=30)
    train_local(model, x.numpy(), y.numpy(), epochs=1, lr=0.1, batch_size=32, deq={"backward": "jfb"})
    return model.double(), x[:12].double(), y[:12]


def _state(model, x, splitting):
    with torch.no_grad():
        W, inj = model.mon.weight(), model.inject(x)
        s, st = splitting_solve(
            W, inj, splitting=splitting, alpha=STEPS[splitting], max_iter=3000, tol=1e-13, stop_mode="abs"
        )
    assert bool(st.converged.all())
    return W, inj, s


@pytest.mark.parametrize("splitting", ["pr", "fb"])
def test_unrolled_splitting_map_contracts_where_the_plain_map_does_not(trained, splitting):
    model, x, _ = trained
    W, inj, s = _state(model, x, splitting)
    T, read = splitting_map(W, inj, splitting, STEPS[splitting])
    d = (read(s) @ W.T + inj > 0).double()
    lam = DEQSettings().phantom_damping
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda v: T(v[None])[0], s[i])
        damped = torch.lerp(torch.eye(HIDDEN, dtype=J.dtype), J, lam)
        assert float(torch.linalg.eigvals(damped).abs().max()) < 0.99
        assert float(torch.linalg.eigvals(torch.diag(d[i]) @ W).abs().max()) > 1.0  # relu(Wz + b)


def _body_grad(model, loss):
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, body)])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_phantom_and_jfb_follow_the_dense_implicit_gradient_unlike_the_plain_map(trained):
    model, x, y = trained
    W, inj, s = _state(model, x, "pr")
    z = F.relu(s)
    # Dense reference: x_y = D (I - Wᵀ D)⁻¹ ∂ℓ/∂z*, then ∂ℓ/∂θ = (∂y/∂θ)ᵀ x_y with y = W z* + U x + b.
    zg = z.clone().requires_grad_(True)
    w = torch.autograd.grad(F.cross_entropy(model.head(zg), y), zg)[0]
    yv = z @ model.mon.weight().T + model.inject(x)
    d = (yv.detach() > 0).double()
    eye = torch.eye(HIDDEN, dtype=torch.float64)
    xy = torch.stack([d[i] * torch.linalg.solve(eye - W.T * d[i], w[i]) for i in range(len(x))])
    exact = _body_grad(model, (yv * xy).sum())

    def grad(splitting, backward):
        out = model(x, splitting=splitting, backward=backward, b_max_iter=20, f_max_iter=3000, tol=1e-13)
        return _body_grad(model, F.cross_entropy(out.logits, y))

    for splitting in ("pr", "fb"):
        assert _cos(grad(splitting, "phantom"), exact) > 0.999
        assert _cos(grad(splitting, "jfb"), exact) > 0.8
    # The former path: 20 damped steps of the plain map z ← relu(W z + U x + b) from z*.
    inj_g, Wg = model.inject(x), model.mon.weight()

    def plain(v):
        return F.relu(v @ Wg.T + inj_g)

    z_out, _ = phantom_unroll(plain, z, plain(z), DEQSettings(b_max_iter=20))
    assert _cos(_body_grad(model, F.cross_entropy(model.head(z_out), y)), exact) < 0.5


def test_forward_backward_default_step_converges_within_the_default_budget(trained):
    model, x, _ = trained
    default = DEQSettings()
    assert model.alpha is None and default_alpha(None, "fb", 1.0) == FB_ALPHA
    for solver in ("fixed_point", default.solver):
        with torch.no_grad():
            out = model(x, splitting="fb", solver=solver, f_max_iter=default.f_max_iter, tol=default.tol)
        assert bool(out.deq.forward.converged.all()), solver
    # The step-size bound m / L² is far smaller and does not converge in the same budget.
    with torch.no_grad():
        W, inj = model.mon.weight(), model.inject(x)
        lip = float(torch.linalg.matrix_norm(torch.eye(HIDDEN, dtype=W.dtype) - W, 2))
        _, st = splitting_solve(W, inj, splitting="fb", alpha=1.0 / lip**2, max_iter=default.f_max_iter)
    assert not bool(st.converged.all())


def test_step_size_search_halves_until_iterations_grow(trained):
    model, x, _ = trained
    with torch.no_grad():
        W, inj = model.mon.weight(), model.inject(x)
        alpha, its = tune_alpha(W, inj, "fb", max_iter=200)
        _, st = splitting_solve(W, inj, splitting="fb", alpha=alpha, max_iter=200, tol=1e-2)
    assert alpha in {2.0**-k for k in range(8)} and its == int(st.nfe.max())
    assert bool(st.converged.all())
    # The model runs the same search on its training batch every `retune_every` calls.
    fb = SPLITTINGS.index("fb")
    model.alpha_tuned[fb] = 1.0
    model.retune_every = 1
    try:
        model(x, splitting="fb", tol=1e-2).logits.sum().backward()
    finally:
        model.retune_every = 100
    assert alpha != 1.0 and float(model.alpha_tuned[fb]) == alpha and "alpha_tuned" in model.state_dict()
