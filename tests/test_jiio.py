"""Joint inference and input optimization: optimality conditions, agreement with the naive loop, the exact
ball ∩ box projection, the JIIO attack against PGD, JIIO adversarial training and its warm backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fedeq.data import load_dataset
from fedeq.models import MLPDEQ, ExplicitMLP
from fedeq.models.parts import deq_parts
from fedeq.robust import (
    AttackConfig,
    DEQDecoder,
    InputProblem,
    JIIOSchedule,
    inpainting_problem,
    jiio,
    jiio_adversarial_loss,
    make_observation,
    naive_input_optimization,
    project,
    project_ball_box,
    robust_accuracy,
    run_attack,
    solve_objective,
    stationarity,
)
from fedeq.robust.input_problem import evaluate
from fedeq.train import train_local
from fedeq.train.adversarial import AdversarialConfig

TOL = 1e-6


def _box_problem(seed: int = 0) -> tuple[InputProblem, torch.Tensor, MLPDEQ, torch.Tensor]:
    """``min_{x∈[0,1]^d} ½||h(z*) - t||² + ½μ||x||²`` on a small contractive MLP DEQ (float64)."""
    torch.manual_seed(seed)
    model = MLPDEQ(10, 6, hidden=16, contraction=0.7).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    parts = deq_parts(model)
    target = torch.randn(4, 6, dtype=torch.float64)

    def objective(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (parts.readout(z) - target).pow(2).sum(1) + 0.05 * x.pow(2).sum(1)

    problem = InputProblem(parts.f, objective, lambda x: parts.z0(parts.inject(x)), lambda x: x.clamp(0, 1))
    return problem, torch.rand(4, 10, dtype=torch.float64), model, target


def _independent_gradient_mapping(model: MLPDEQ, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||x - Proj(x - α∇_x ℓ)|| / α`` with ``∇_x`` from the DEQ layer's own implicit backward."""
    tight = {"f_max_iter": 300, "b_max_iter": 300, "tol": 1e-13, "stop_mode": "abs", "backward": "ift"}
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = 0.5 * (model(xr, **tight).logits - target).pow(2).sum() + 0.05 * xr.pow(2).sum()
        (g,) = torch.autograd.grad(loss, xr)
    return (x - (x - ALPHA * g).clamp(0, 1)).norm(dim=1) / ALPHA


ALPHA = 0.3


def test_jiio_fixed_point_satisfies_first_order_conditions() -> None:
    problem, x0, model, target = _box_problem()
    res = jiio(problem, x0, ALPHA, max_iter=3000, tol=1e-11)
    r = res.residuals
    assert float(r.equilibrium.max()) < TOL  # z = f(z, x)
    assert float(r.adjoint.max()) < TOL  # λ = J_zᵀλ + ∂ℓ/∂z
    assert float(r.gradient_mapping.max()) < 1e-8  # x = Proj(x - α ∇_x)
    # at the start the conditions are far from satisfied: the check can fail
    start = stationarity(problem, problem.initial_state(x0), torch.zeros(4, 16, dtype=x0.dtype), x0, ALPHA)
    assert float(start.gradient_mapping.min()) > 1e-2 and float(start.adjoint.min()) > 0.5
    # the same condition checked with the gradient of the DEQ layer itself (independent of the map above)
    assert float(_independent_gradient_mapping(model, target, res.x).max()) < 1e-6
    assert float(_independent_gradient_mapping(model, target, x0).min()) > 1e-2
    # some coordinates sit on the box: the projection matters
    assert bool(((res.x == 0) | (res.x == 1)).any())
    # the naive loop (full solves per step; the stationary point does not depend on α) reaches the same
    # point and objective ...
    naive = naive_input_optimization(
        problem, x0, 2 * ALPHA, outer_steps=400, tol=1e-9, x_tol=1e-5, warm_start=True
    )
    assert float(naive.residuals.gradient_mapping.max()) < 1e-4
    assert torch.allclose(res.x, naive.x, atol=1e-4)
    assert torch.allclose(solve_objective(problem, res.x), solve_objective(problem, naive.x), atol=1e-7)
    assert solve_objective(problem, res.x).sum() < solve_objective(problem, x0).sum()
    # ... and, even stopped at a looser tolerance, spends more function evaluations and VJPs doing it
    assert naive.f_evals > 2 * res.f_evals and naive.vjps > 3 * res.vjps


def test_jiio_returns_its_last_iterate_with_per_block_damping() -> None:
    """Three damped joint updates by hand: ``z ← z + 0.8 (f - z)``, ``λ ← λ + 0.6 (λ⁺ - λ)``, then x."""
    problem, x0, _, _ = _box_problem(1)
    res = jiio(problem, x0, ALPHA, max_iter=3, residuals=False)
    x = x0.clamp(0, 1)
    z, lam = problem.initial_state(x), torch.zeros(4, 16, dtype=x0.dtype)
    for _ in range(3):
        ev = evaluate(problem, z, lam, x)
        z, lam, x = z + 0.8 * (ev.fz - z), lam + 0.6 * (ev.lam - lam), (x - ALPHA * ev.grad_x).clamp(0, 1)
    assert torch.allclose(res.x, x, atol=1e-12) and torch.allclose(res.z, z) and torch.allclose(res.lam, lam)
    assert res.f_evals == res.vjps == res.iterations == 3 and res.residuals is None
    # the step schedule switches to ``late_step`` after ``switch_at`` updates; undamped blocks differ
    late = jiio(problem, x0, ALPHA, max_iter=3, schedule=JIIOSchedule(late_step=0.0, switch_at=1))
    one = jiio(problem, x0, ALPHA, max_iter=1)
    assert torch.equal(late.x, one.x)
    plain = jiio(problem, x0, ALPHA, max_iter=3, schedule=JIIOSchedule(1.0, 1.0))
    assert not torch.allclose(plain.z, res.z)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "broyden"}, "solver must be one of fixed_point, anderson"),
        ({"select": "lowest"}, "select must be one of last, best"),
        ({"schedule": JIIOSchedule(z_damping=1.5)}, "z_damping must be in"),
        ({"schedule": JIIOSchedule(direction="adam")}, "direction must be one of gradient, l2, sign"),
    ],
)
def test_jiio_rejects_bad_options(kwargs: dict, match: str) -> None:
    problem, x0, _, _ = _box_problem()
    with pytest.raises(ValueError, match=match):
        jiio(problem, x0, ALPHA, max_iter=2, **kwargs)


def _slsqp_projection(v: np.ndarray, x0: np.ndarray, eps: float) -> np.ndarray:
    """Brute-force reference: ``min ½||x - v||²`` s.t. ``||x - x0||₂ ≤ ε``, ``0 ≤ x ≤ 1`` with SLSQP."""
    cons = {"type": "ineq", "fun": lambda x: eps**2 - ((x - x0) ** 2).sum(), "jac": lambda x: -2 * (x - x0)}
    res = minimize(
        lambda x: 0.5 * ((x - v) ** 2).sum(),
        x0,
        jac=lambda x: x - v,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * v.size,
        constraints=[cons],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


def test_exact_projection_onto_l2_ball_and_box_matches_a_convex_solver() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 7, generator=gen, dtype=torch.float64)
    v = x0 + 0.8 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    eps = 0.35
    exact = project_ball_box(v, x0, eps, "l2")
    ref = np.stack([_slsqp_projection(v[i].numpy(), x0[i].numpy(), eps) for i in range(6)])
    assert np.abs(exact.numpy() - ref).max() < 1e-6
    assert float((exact - x0).norm(dim=1).max()) <= eps + 1e-12 and exact.min() >= 0 and exact.max() <= 1
    # projecting onto the ball and then clipping is not the projection onto the intersection
    clipped = (x0 + project(v - x0, eps, "l2")).clamp(0, 1)
    gap = (clipped - exact).abs().amax(dim=1)
    assert float(gap.max()) > 1e-3
    # ... and is never closer to v
    assert torch.all((exact - v).norm(dim=1) <= (clipped - v).norm(dim=1) + 1e-12)
    # L∞: the intersection is a box, the projection a clip; points already inside stay put
    box = project_ball_box(v, x0, 0.1, "linf")
    assert torch.equal(box, torch.minimum(torch.maximum(v, x0 - 0.1), x0 + 0.1).clamp(0, 1))
    inside = project_ball_box(exact, x0, eps, "l2")
    assert torch.allclose(inside, exact, atol=1e-12)


DIGITS_DEQ = {"solver": "anderson", "f_max_iter": 12, "b_max_iter": 12, "tol": 1e-4}


@pytest.fixture(scope="module")
def digits_model() -> tuple[MLPDEQ, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small MLP-DEQ trained briefly on digits (the same seed gives the same model)."""
    sp = load_dataset("digits", seed=0)
    x, y = torch.from_numpy(sp.x_train.copy()), torch.from_numpy(sp.y_train.copy())
    torch.manual_seed(0)
    model = MLPDEQ(64, 10, hidden=32)
    train_local(model, x, y, epochs=4, lr=0.01, batch_size=32, deq=DIGITS_DEQ, seed=0)
    model.eval()
    return model, x, y, torch.from_numpy(sp.x_test.copy()), torch.from_numpy(sp.y_test.copy())


def test_jiio_attack_against_pgd_at_equal_steps(digits_model) -> None:
    model, _, _, xt, yt = digits_model

    def robust(kind: str, steps: int, **options) -> tuple[float, float]:
        cfg = AttackConfig(kind, epsilon=0.1, steps=steps, options=options)
        res = run_attack(model, xt[:64], yt[:64], cfg, deq=DIGITS_DEQ)  # cost per sample of one batch
        acc = robust_accuracy(model, xt, yt, cfg, deq=DIGITS_DEQ).robust_acc
        return float(acc), res.nfe_fwd

    clean = robust_accuracy(model, xt, yt, AttackConfig("pgd", epsilon=0.0), deq=DIGITS_DEQ).clean_acc
    pgd5, pgd10 = robust("pgd", 5), robust("pgd", 10)
    jiio5, jiio10, jiio40 = robust("jiio", 5), robust("jiio", 10), robust("jiio", 40)
    assert clean > 0.9 and pgd10[0] < 0.6
    # started from the full solve, the first joint update is PGD's first step: equal after one step ...
    assert robust("jiio", 1)[0] == robust("pgd", 1)[0]
    # ... afterwards the state and adjoint lag the input (one damped update each per step), so at 5 and 10
    # joint iterations the last iterate is weaker than PGD at the same number of steps (measured: +4.7 and
    # +2.5 points, at a third and a fifth of PGD's evaluations of f; see docs/robustness.md) ...
    assert jiio5[0] <= pgd5[0] + 0.06 and jiio10[0] <= pgd10[0] + 0.035
    assert jiio5[1] < 0.4 * pgd5[1] and jiio10[1] < 0.3 * pgd10[1]
    # ... and with 40 iterations it matches PGD-10 at about PGD-5's evaluations of f
    assert jiio40[0] <= pgd10[0] + 0.01
    assert jiio40[1] < 1.2 * pgd5[1] < 0.7 * pgd10[1]
    # the reference's acceptance rule (an option of the same attack) lags in the same way (measured +3.1)
    assert robust("jiio", 10, select="best")[0] <= pgd10[0] + 0.04


def test_jiio_attack_stays_in_the_l2_ball_and_box(digits_model) -> None:
    model, _, _, xt, yt = digits_model
    x, y = xt[:32], yt[:32]
    for opts in ({}, {"solver": "anderson", "m": 5}, {"warm_start": False}):
        res = run_attack(model, x, y, AttackConfig("jiio", epsilon=0.5, norm="l2", steps=8, options=opts))
        assert float((res.x_adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6
        assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with pytest.raises(ValueError, match="unknown jiio attack option"):
        run_attack(model, x, y, AttackConfig("jiio", options={"dampnig": 0.5}))


def test_jiio_training_backward_warm_started_from_the_adjoint(digits_model) -> None:
    """The warm-started adjoint gives the implicit gradient at JIIO's state with fewer VJPs."""
    model, x, y, _, _ = digits_model
    cfg = AttackConfig("jiio", epsilon=0.1, steps=40)
    deq = {**DIGITS_DEQ, "b_max_iter": 60, "tol": 1e-6}
    grads, vjps = {}, {}
    for warm in (True, False):
        model.zero_grad(set_to_none=True)
        loss, out, nf, _ = jiio_adversarial_loss(
            model, x[:64], y[:64], cfg, deq, torch.Generator().manual_seed(0), warm_backward=warm
        )
        loss.backward()
        grads[warm] = torch.cat([p.grad.flatten() for p in model.parameters()])
        vjps[warm] = out.deq.backward.nfe
        assert out.deq.backward.ready and nf > 10
    model.zero_grad(set_to_none=True)
    model.eval()
    assert float((grads[True] - grads[False]).norm() / grads[False].norm()) < 1e-3
    assert vjps[True] < vjps[False]


@pytest.mark.slow
def test_jiio_adversarial_training_matches_pgd_at_with_fewer_evaluations(digits_model) -> None:
    model, x, y, xt, yt = digits_model
    results = {}
    for name, adv in (
        ("pgd-at", AdversarialConfig("pgd", epsilon=0.1, steps=5)),
        ("jiio-at", AdversarialConfig("pgd", epsilon=0.1, steps=10, attack="jiio")),
    ):
        net = MLPDEQ(64, 10, hidden=32)
        net.load_state_dict(model.state_dict())
        stats = train_local(
            net, x, y, epochs=1, lr=0.01, batch_size=32, deq=DIGITS_DEQ, seed=0, adversarial=adv
        )
        acc = robust_accuracy(net, xt, yt, AttackConfig("pgd", epsilon=0.1, steps=10), deq=DIGITS_DEQ)
        results[name] = (acc.robust_acc, stats.nfe_fwd, stats.nfe_bwd)
    base = robust_accuracy(model, xt, yt, AttackConfig("pgd", epsilon=0.1, steps=10), deq=DIGITS_DEQ)
    (r_pgd, f_pgd, b_pgd), (r_jiio, f_jiio, b_jiio) = results["pgd-at"], results["jiio-at"]
    assert r_pgd > base.robust_acc + 0.15  # adversarial training works at all
    assert r_jiio >= r_pgd - 0.02, results
    assert f_jiio < 0.6 * f_pgd and b_jiio < 0.8 * b_pgd, results


def test_jiio_needs_an_equilibrium_map() -> None:
    with pytest.raises(TypeError, match="equilibrium map"):
        run_attack(ExplicitMLP(64, 10), torch.rand(2, 64), torch.tensor([0, 1]), AttackConfig("jiio"))


@pytest.mark.parametrize("task", ["block", "denoise"])
def test_inverse_problems_with_a_decoder_deq(task: str) -> None:
    torch.manual_seed(0)
    dec = DEQDecoder(6, (1, 8, 8), hidden=24).double().eval()
    code = torch.randn(5, 6, dtype=torch.float64)
    truth = dec(code, f_max_iter=100, tol=1e-10).detach()
    y, mask = make_observation(truth, task=task, noise=0.0 if task == "block" else 0.1, seed=0)
    problem = inpainting_problem(dec, y, mask, mu=1e-3)
    c0 = torch.zeros(5, 6, dtype=torch.float64)
    res = jiio(problem, c0, 2.0, max_iter=600, tol=1e-10)
    assert float(res.residuals.equilibrium.max()) < 1e-5
    assert float(res.residuals.adjoint.max()) < 1e-4
    assert float(res.residuals.gradient_mapping.max()) < 1e-4
    # below the objective at the true code (which explains y up to the noise)
    assert torch.all(solve_objective(problem, res.x) < solve_objective(problem, code) + 1e-6)
    assert torch.all(solve_objective(problem, res.x) < 0.8 * solve_objective(problem, c0))
    with torch.no_grad():
        recon = dec(res.x, f_max_iter=100, tol=1e-10)
    if task == "block":  # the missing block is filled in
        hole = 1 - mask
        err = ((recon - truth) * hole).pow(2).sum() / hole.sum()
        blank = (truth * hole).pow(2).sum() / hole.sum()
        assert float(hole.sum()) == 5 * 16 and float(err) < 0.5 * float(blank)
    else:  # every pixel observed with noise: the reconstruction is closer to the truth than y
        assert float(mask.min()) == 1
        assert float((recon - truth).pow(2).mean()) < 0.5 * float((y - truth).pow(2).mean())
