"""Solvers: convergence, exact budgets, divergence handling, argument validation, the registry."""

from dataclasses import dataclass

import pytest
import torch

import fedeq.deq.solvers.iterate as iterate
from fedeq.deq.solvers import (
    Anderson,
    Broyden,
    BroydenFactors,
    FixedPoint,
    Solver,
    broyden_transpose_apply,
    get_solver,
    solve,
)
from fedeq.deq.solvers.broyden_explicit import ExplicitBroydenState
from fedeq.deq.solvers.workspace import WORKSPACE
from fedeq.registry import SOLVERS

SOLVER_NAMES = list(SOLVERS.names())


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
    with pytest.raises(TypeError):
        Anderson(memory=3)
    with pytest.raises(ValueError, match="damping must be in"):
        FixedPoint(damping=0.0)  # values are checked when the solver object is built


def test_solver_objects_carry_their_options():
    w, c = _linear_problem(rho=0.95, seed=2)
    f = lambda z: z @ w.T + c  # noqa: E731
    z_name, st_name = solve(f, torch.zeros_like(c), "anderson", max_iter=9, tol=1e-30, m=3, beta=0.7)
    z_obj, st_obj = solve(f, torch.zeros_like(c), Anderson(m=3, beta=0.7), max_iter=9, tol=1e-30)
    assert torch.equal(z_name, z_obj) and torch.equal(st_name.abs_residual, st_obj.abs_residual)
    z_def, _ = solve(f, torch.zeros_like(c), Anderson(), max_iter=9, tol=1e-30)
    assert not torch.equal(z_def, z_obj)  # the options changed the result
    assert get_solver("broyden") is Broyden and Broyden.default_backward_solver == "anderson"
    with pytest.raises(TypeError, match="set them on the object"):
        solve(f, torch.zeros_like(c), Anderson(), m=3)


# --- Broyden's residual-basis form and reused solver buffers ----------------------------------------------


def _wide_problem(b: int = 5, d: int = 48, rho: float = 0.8, seed: int = 3):
    """A contraction with more entries per sample than evaluations (Broyden keeps its residual basis)."""
    w, c = _linear_problem(b, d, rho, seed)
    return (lambda z: torch.tanh(z @ w.T + c)), torch.zeros_like(c)


@dataclass(frozen=True, kw_only=True)
class _ExplicitBroyden(Broyden):
    """Broyden that always keeps its factors explicitly, with memory for every update."""

    def init(self, z, max_iter):
        return ExplicitBroydenState(z, max(max_iter - 1, 1))


def test_broyden_residual_basis_matches_explicit_factors():
    f, z0 = _wide_problem()
    for max_iter in (1, 2, 5, 20):
        z, st = solve(f, z0, "broyden", max_iter=max_iter, tol=1e-30, stop_mode="abs", keep_trace=True)
        assert isinstance(st.broyden_factors, BroydenFactors)
        z_ref, ref = solve(
            f, z0, _ExplicitBroyden(keep_trace=True), max_iter=max_iter, tol=1e-30, stop_mode="abs"
        )
        assert isinstance(ref.broyden_factors, tuple)
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.stack(st.trace), torch.stack(ref.trace), rtol=1e-8, atol=1e-14)
        assert torch.equal(st.nfe, ref.nfe)
        w = torch.randn_like(z0)
        expected = broyden_transpose_apply(ref.broyden_factors, w)
        torch.testing.assert_close(
            broyden_transpose_apply(st.broyden_factors, w), expected, rtol=1e-7, atol=1e-9
        )
        u, v = st.broyden_factors  # formed on first access, same shapes as the explicit ones
        u_ref, v_ref = ref.broyden_factors
        assert u.shape == v.shape == u_ref.shape == (z0.shape[0], max_iter - 1, z0.shape[1])
        torch.testing.assert_close(u.mT @ v, u_ref.mT @ v_ref, rtol=1e-7, atol=1e-9)  # U Vᵀ per sample
        # Once formed, the pair is used as is.
        torch.testing.assert_close(
            broyden_transpose_apply(st.broyden_factors, w), expected, rtol=1e-7, atol=1e-9
        )


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_wide_per_sample_stopping_and_divergence(name):
    # As the two tests above, with 64 entries per sample (Broyden keeps its residual basis).
    c = torch.zeros(3, 64, dtype=torch.float64)
    c[1] = torch.linspace(-1, 1, 64, dtype=torch.float64)

    def f(z):
        out = 0.5 * z + c
        out[2] = torch.exp(z[2].abs() * 50 + 50)
        return out

    z, st = solve(f, torch.zeros_like(c), name, max_iter=30, tol=1e-8, stop_mode="abs")
    assert st.nfe[0] == 1 and st.nfe[1] > 1
    assert st.converged.tolist() == [True, True, False] and st.diverged.tolist() == [False, False, True]
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[1], 2 * c[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_reused_buffers_give_identical_results(name, monkeypatch):
    # Solver buffers are kept between calls on the CPU: a solve must not see what an earlier one left.
    f, z0 = _wide_problem()
    g, _ = _wide_problem(seed=4)
    opts = {"m": 4} if name == "anderson" else {}
    solve(g, z0 + 0.3, name, max_iter=12, tol=1e-30, **opts)
    z1, s1 = solve(f, z0, name, max_iter=12, tol=1e-30, **opts)
    monkeypatch.setattr(WORKSPACE, "enabled", False)  # fresh buffers on every call
    z2, s2 = solve(f, z0, name, max_iter=12, tol=1e-30, **opts)
    assert torch.equal(z1, z2) and torch.equal(s1.abs_residual, s2.abs_residual)


def test_broyden_factors_outlive_later_solves():
    # The factors refer to the solver's buffers, which later solves of the same size must not overwrite.
    f, z0 = _wide_problem()
    g, _ = _wide_problem(seed=4)
    _, st = solve(f, z0, "broyden", max_iter=10, tol=1e-30)
    for _ in range(3):
        solve(g, z0, "broyden", max_iter=10, tol=1e-30)
    _, fresh = solve(f, z0, "broyden", max_iter=10, tol=1e-30)
    w = torch.randn_like(z0)
    torch.testing.assert_close(
        broyden_transpose_apply(st.broyden_factors, w), broyden_transpose_apply(fresh.broyden_factors, w)
    )
    u, v = st.broyden_factors
    u2, v2 = fresh.broyden_factors
    assert torch.equal(u, u2) and torch.equal(v, v2)


def _nested_problem(name: str, inner_iter: int):
    """An ``f`` that itself runs ``name`` on a problem of the same size (a DEQ inside a DEQ)."""
    f, z0 = _wide_problem()

    def outer(z):
        return 0.5 * solve(f, z, name, max_iter=inner_iter, tol=1e-30)[0]

    return outer, z0


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_nested_solves_use_separate_buffers(name, monkeypatch):
    # f itself runs a solver of the same size (a DEQ inside a DEQ): each solve needs its own buffers.
    outer, z0 = _nested_problem(name, inner_iter=5)
    z, _ = solve(outer, z0, name, max_iter=8, tol=1e-30)
    monkeypatch.setattr(WORKSPACE, "enabled", False)
    z_ref, _ = solve(outer, z0, name, max_iter=8, tol=1e-30)
    assert torch.equal(z, z_ref)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("d", [3, 64])
def test_device_path_matches_host_path(name, d, monkeypatch):
    # GPUs take the path without host checks and without kept buffers; force it on the CPU and compare.
    c = torch.zeros(4, d, dtype=torch.float64)
    c[1] = torch.linspace(-1, 1, d, dtype=torch.float64)
    c[3] = torch.linspace(1, 2, d, dtype=torch.float64)

    def f(z):
        out = torch.tanh(0.6 * z.roll(1, 1) + c)
        out[2] = torch.exp(z[2].abs() * 50 + 50)  # diverges
        return out

    z0 = torch.zeros_like(c)
    host = solve(f, z0, name, max_iter=25, tol=1e-9, stop_mode="abs")
    monkeypatch.setattr(iterate, "host_checks", lambda z: False)
    monkeypatch.setattr(WORKSPACE, "enabled", False)
    device = solve(f, z0, name, max_iter=25, tol=1e-9, stop_mode="abs", check_every=4)
    torch.testing.assert_close(device[0], host[0], rtol=0, atol=1e-12)
    for field in ("nfe", "converged", "diverged"):
        assert torch.equal(getattr(device[1], field), getattr(host[1], field)), field
    assert host[1].diverged.tolist() == [False, False, True, False]


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_kept_buffers_work_in_and_out_of_inference_mode(name):
    # A buffer first made under torch.inference_mode must stay writable by later ordinary solves.
    f, z0 = _wide_problem(b=3, d=56)
    with torch.inference_mode():
        a, _ = solve(f, z0, name, max_iter=9, tol=1e-30)
    b, _ = solve(f, z0, name, max_iter=9, tol=1e-30)
    with torch.inference_mode():
        c, _ = solve(f, z0, name, max_iter=9, tol=1e-30)
    assert torch.equal(a, b) and torch.equal(b, c)


# --- The registry and the shared loop ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Halfway(Solver):
    """``z ← (z + f(z)) / 2``: a solver written outside the package, with one option."""

    weight: float = 0.5

    def step(self, state, k, z, fz, track, last):
        return None if last else torch.lerp(z, fz, self.weight)


@pytest.fixture
def halfway():
    SOLVERS.register("halfway", _Halfway)
    yield "halfway"
    SOLVERS.unregister("halfway")


def test_registered_solver_is_usable_by_name(halfway):
    w, c = _linear_problem(rho=0.5)
    z, st = solve(lambda z: z @ w.T + c, torch.zeros_like(c), "halfway", max_iter=400, tol=1e-10, weight=0.8)
    exact = torch.linalg.solve(torch.eye(w.shape[0], dtype=w.dtype) - w, c.T).T
    assert st.converged.all() and (st.nfe < 400).all()
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-8)
    with pytest.raises(TypeError):
        solve(lambda z: z, torch.zeros(1, 2), "halfway", m=3)  # an option of another solver


def test_unknown_solver_lists_registered_names(halfway):
    with pytest.raises(ValueError, match="solver must be one of fixed_point, anderson, broyden, halfway"):
        solve(lambda z: z, torch.zeros(1, 2), "newton")


def test_budgets_are_exact_for_every_registered_solver(halfway):
    w, c = _linear_problem(rho=0.95, seed=5)
    for name in SOLVERS.names():
        for max_iter in (1, 2, 6, 13):
            calls = []

            def f(z, calls=calls):
                calls.append(z.shape)
                return torch.tanh(z @ w.T + c)

            z, st = solve(f, torch.zeros_like(c), name, max_iter=max_iter, tol=1e-30, keep_trace=True)
            assert len(calls) == max_iter and (st.nfe == max_iter).all(), (name, max_iter)
            assert len(st.trace) == max_iter
            # The returned point is the candidate with the lowest residual, which is what is reported.
            res = torch.stack(st.trace).min(dim=0).values
            torch.testing.assert_close(st.rel_residual, res, rtol=0, atol=0)
        # Every sample at its fixed point from the start: each stops after one evaluation; the loop looks at
        # the batch every `check_every` evaluations, so it stops after that many calls (within the budget).
        z0 = torch.tanh(c)
        for every, max_iter in ((1, 10), (3, 10), (4, 2)):
            counted = []

            def g(z, counted=counted):
                counted.append(1)
                return torch.tanh(c)

            _, st = solve(g, z0, name, max_iter=max_iter, tol=1e-6, check_every=every)
            assert (st.nfe == 1).all() and st.converged.all(), name
            assert len(counted) == min(every, max_iter), (name, every, max_iter)
