"""Joint inference and input optimization: optimality conditions, agreement with the naive loop, attacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedeq.models import MLPDEQ, ExplicitMLP
from fedeq.models.parts import deq_parts
from fedeq.robust import (
    AttackConfig,
    DEQDecoder,
    InputProblem,
    inpainting_problem,
    jiio,
    make_observation,
    naive_input_optimization,
    pgd,
    run_attack,
    solve_objective,
    stationarity,
)

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


@pytest.fixture(scope="module")
def naive_solution():
    problem, x0, _, _ = _box_problem()
    return naive_input_optimization(problem, x0, ALPHA, outer_steps=2000, tol=1e-9, x_tol=1e-6)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_jiio_fixed_point_satisfies_first_order_conditions(solver: str, naive_solution) -> None:
    problem, x0, model, target = _box_problem()
    res = jiio(problem, x0, ALPHA, max_iter=3000, tol=1e-11, solver=solver)
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
    # the naive loop (full solves per step) reaches the same point and objective ...
    naive = naive_solution
    assert float(naive.residuals.gradient_mapping.max()) < 1e-5
    assert torch.allclose(res.x, naive.x, atol=1e-5)
    assert torch.allclose(solve_objective(problem, res.x), solve_objective(problem, naive.x), atol=1e-8)
    assert solve_objective(problem, res.x).sum() < solve_objective(problem, x0).sum()
    # ... and spends many more function evaluations doing it
    assert naive.f_evals > 3 * res.f_evals


def test_jiio_attack_increases_loss_inside_the_ball() -> None:
    torch.manual_seed(0)
    model = MLPDEQ(64, 10, hidden=32).eval()
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    deq = {"f_max_iter": 20, "b_max_iter": 20, "tol": 1e-6}
    eps = 0.1
    cfg = AttackConfig("jiio", epsilon=eps, steps=30, random_start=False)
    res = run_attack(model, x, y, cfg, deq=deq)
    assert float((res.x_adv - x).abs().max()) <= eps + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        clean = F.cross_entropy(model(x, **deq).logits, y)
        adv = F.cross_entropy(model(res.x_adv, **deq).logits, y)
        ref = F.cross_entropy(model(pgd(model, x, y, epsilon=eps, steps=10, deq=deq), **deq).logits, y)
    assert float(adv) > float(clean) + 0.5 * (float(ref) - float(clean))
    # one warm-start solve plus one f and one VJP per joint iteration: far below 10 full PGD steps
    assert res.nfe_fwd < 10 * 20


def test_jiio_needs_an_equilibrium_map() -> None:
    with pytest.raises(TypeError, match="equilibrium map"):
        run_attack(ExplicitMLP(64, 10), torch.rand(2, 64), torch.tensor([0, 1]), AttackConfig("jiio"))


def test_inpainting_problem_with_decoder_deq() -> None:
    torch.manual_seed(0)
    dec = DEQDecoder(6, (1, 8, 8), hidden=24).double().eval()
    truth = dec(torch.randn(5, 6, dtype=torch.float64), f_max_iter=100, tol=1e-10).detach()
    y, mask = make_observation(truth, missing=0.5, noise=0.0, seed=0)
    problem = inpainting_problem(dec, y, mask, mu=1e-3)
    c0 = torch.zeros(5, 6, dtype=torch.float64)
    res = jiio(problem, c0, 2.0, max_iter=1500, tol=1e-10, solver="anderson")
    assert float(res.residuals.equilibrium.max()) < TOL
    assert float(res.residuals.adjoint.max()) < TOL
    assert float(res.residuals.gradient_mapping.max()) < 1e-5
    before = solve_objective(problem, c0)
    after = solve_objective(problem, res.x)
    assert torch.all(after < 0.2 * before)
    with torch.no_grad():
        recon = dec(res.x, f_max_iter=100, tol=1e-10)
    err_missing = ((recon - truth) * (1 - mask)).pow(2).sum() / (1 - mask).sum()
    err_blank = (truth * (1 - mask)).pow(2).sum() / (1 - mask).sum()
    assert float(err_missing) < 0.5 * float(err_blank)  # the missing pixels are filled in
