"""Solvers: convergence, exact budgets, divergence handling, argument validation."""

import pytest
import torch

from fedeq.solvers import SOLVERS, solve

SOLVER_NAMES = list(SOLVERS)


def _linear_problem(b: int = 6, d: int = 24, rho: float = 0.7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = rho * w / torch.linalg.matrix_norm(w, 2)
    c = torch.randn(b, d, generator=g, dtype=torch.float64)
    return w, c


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_linear_fixed_point_matches_dense_solve(name):
    w, c = _linear_problem()
    z, st = solve(lambda z: z @ w.T + c, torch.zeros_like(c), name, max_iter=200, tol=1e-11, stop_mode="abs")
    exact = torch.linalg.solve(torch.eye(w.shape[0], dtype=w.dtype) - w, c.T).T
    assert st.converged.all() and not st.diverged.any()
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-9)
    assert (st.abs_residual <= 1e-11).all()


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_reaches_tolerance_on_contraction(name, stop_mode):
    w, c = _linear_problem(rho=0.9, seed=1)
    f = lambda z: torch.tanh(z @ w.T + c)  # noqa: E731
    z, st = solve(f, torch.zeros_like(c), name, max_iter=100, tol=1e-8, stop_mode=stop_mode)
    res = st.abs_residual if stop_mode == "abs" else st.rel_residual
    assert st.converged.all() and (res <= 1e-8).all()
    # The reported residual is the real one of the returned point's pre-image: check f(z) ≈ z directly.
    assert (f(z) - z).norm(dim=1).max() < 1e-6


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("max_iter", [1, 2, 3, 5, 17])
def test_budget_is_exact_and_never_returns_initial_guess(name, max_iter):
    w, c = _linear_problem(rho=0.95, seed=2)
    calls = []

    def f(z):
        calls.append(1)
        return z @ w.T + c

    z0 = torch.zeros_like(c)
    z, st = solve(f, z0, name, max_iter=max_iter, tol=1e-30)
    assert len(calls) == max_iter
    assert (st.nfe == max_iter).all()
    assert not torch.allclose(z, z0)
    if max_iter == 1:
        torch.testing.assert_close(z, f(z0))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_sample_stopping(name):
    # Sample 0 is already at its fixed point (f = identity map to a constant), sample 1 is not.
    c = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    f = lambda z: 0.5 * z + c  # noqa: E731
    z0 = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    _, st = solve(f, z0, name, max_iter=50, tol=1e-6, stop_mode="abs")
    assert st.nfe[0] == 1 and st.nfe[1] > 1
    assert st.converged.all()


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_divergence_is_flagged_not_crashed(name):
    # Sample 0 explodes to inf, sample 1 is contractive.
    def f(z):
        out = z.clone()
        out[0] = torch.exp(z[0].abs() * 50 + 50)
        out[1] = 0.5 * z[1] + 1.0
        return out

    z0 = torch.ones(2, 3, dtype=torch.float64)
    z, st = solve(f, z0, name, max_iter=30, tol=1e-8, stop_mode="abs")
    assert st.diverged.tolist() == [True, False]
    assert st.converged.tolist() == [False, True]
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[1], torch.full((3,), 2.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_trace_and_broyden_factors():
    w, c = _linear_problem()
    _, st = solve(
        lambda z: z @ w.T + c, torch.zeros_like(c), "broyden", max_iter=8, tol=1e-30, keep_trace=True
    )
    assert len(st.trace) == 8 and st.trace[-1].shape == (c.shape[0],)
    u, v = st.broyden_factors
    assert u.shape == v.shape == (c.shape[0], 7, c.shape[1])


def test_broyden_factors_approximate_inverse_jacobian():
    # On a linear map g(z) = (W - I) z + c, Broyden's inverse estimate must act like (W - I)^{-1} on g.
    w, c = _linear_problem(d=10, rho=0.5)
    z, st = solve(
        lambda z: z @ w.T + c, torch.zeros_like(c), "broyden", max_iter=40, tol=1e-12, stop_mode="abs"
    )
    u, v = st.broyden_factors
    r = torch.randn_like(c)
    b_r = -r + torch.einsum("bn,bnd->bd", torch.einsum("bnd,bd->bn", v, r), u)
    exact = torch.linalg.solve(w - torch.eye(10, dtype=w.dtype), r.T).T
    cos = torch.nn.functional.cosine_similarity(b_r, exact, dim=1)
    assert (cos > 0.9).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "andersen"}, "solver must be one of fixed_point, anderson, broyden"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"tol": 0.0}, "tol must be a number > 0"),
        ({"stop_mode": "relative"}, "stop_mode must be one of abs, rel"),
        ({"solver": "anderson", "m": 0}, "m must be an integer >= 1"),
        ({"solver": "fixed_point", "damping": 1.5}, "damping must be in"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve(lambda z: z, torch.zeros(1, 2), **kwargs)


def test_unknown_solver_option_raises():
    with pytest.raises(TypeError):
        solve(lambda z: z, torch.zeros(1, 2), "anderson", memory=3)
