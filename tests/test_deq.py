"""Implicit layer: gradients against finite differences, unrolled autograd and TorchDEQ; options."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedeq.deq.backward import Backward, BroydenReuse, required_solver
from fedeq.deq.layer import DEQ, DEQSettings
from fedeq.deq.regularizers import jacobian_frobenius, spectral_norm_estimate
from fedeq.deq.solvers import Solver
from fedeq.registry import BACKWARDS, SOLVERS

D = 12
B = 5


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x), W with spectral norm rho (well conditioned)."""

    def __init__(self, rho: float = 0.6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(rho * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    return x, c


def _grads(deq: DEQ, x, c):
    x = x.clone().requires_grad_(True)
    out = deq(x, torch.zeros_like(x))
    loss = (out.z * c).sum()
    gw, gx = torch.autograd.grad(loss, [deq.func.W, x])
    return gw, gx, out


def _unrolled_grads(cell: Cell, x, c, steps: int = 400):
    x = x.clone().requires_grad_(True)
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return torch.autograd.grad((z * c).sum(), [cell.W, x])


def _cos(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_ift_gradient_matches_finite_differences_and_unrolled(solver):
    x, c = _data()
    deq = DEQ(
        Cell(), solver=solver, f_max_iter=300, b_max_iter=300, tol=1e-13, stop_mode="abs", backward="ift"
    )
    gw, gx, out = _grads(deq, x, c)
    assert out.backward.ready and out.backward.nfe > 0
    assert float(out.backward.abs_residual.max()) <= 1e-12

    ref_w, ref_x = _unrolled_grads(Cell(), x, c)
    torch.testing.assert_close(gw, ref_w, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gx, ref_x, rtol=1e-5, atol=1e-9)

    def loss_at(w):
        cell = Cell()
        with torch.no_grad():
            cell.W.copy_(w)
        d = DEQ(cell, solver=solver, f_max_iter=300, tol=1e-14, stop_mode="abs")
        with torch.no_grad():
            return float((d(x, torch.zeros_like(x)).z * c).sum())

    h = 1e-6
    w0 = deq.func.W.detach()
    for i, j in [(0, 0), (3, 7), (11, 2)]:
        e = torch.zeros_like(w0)
        e[i, j] = h
        fd = (loss_at(w0 + e) - loss_at(w0 - e)) / (2 * h)
        assert abs(fd - float(gw[i, j])) <= 1e-5 * max(1.0, abs(fd))


def test_ift_gradient_matches_dense_adjoint_solve():
    # g = (I - J_fᵀ)^{-1} w computed with a dense Jacobian at z*.
    x, c = _data(3)
    cell = Cell()
    deq = DEQ(cell, solver="anderson", f_max_iter=200, b_max_iter=200, tol=1e-13, stop_mode="abs")
    _, gx, out = _grads(deq, x, c)
    z = out.z.detach()
    for b in range(B):
        jac = torch.autograd.functional.jacobian(lambda v, xb=x[b]: cell(v, xb), z[b])
        g = torch.linalg.solve(torch.eye(D, dtype=z.dtype) - jac.T, c[b])
        dx = (1 - torch.tanh(z[b] @ cell.W.T + x[b]) ** 2) * g  # ∂f/∂x = diag(1 - tanh²)
        torch.testing.assert_close(gx[b], dx, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("backward, solver", [("broyden_reuse", "broyden"), ("phantom", "anderson")])
def test_approximate_gradients_are_aligned_with_ift(backward, solver):
    x, c = _data(4)
    ift_w, ift_x, _ = _grads(DEQ(Cell(rho=0.5), solver=solver, f_max_iter=60, b_max_iter=60, tol=1e-10), x, c)
    gw, gx, out = _grads(
        DEQ(Cell(rho=0.5), solver=solver, f_max_iter=60, b_max_iter=10, tol=1e-10, backward=backward), x, c
    )
    assert _cos(gw, ift_w) >= 0.9 and _cos(gx, ift_x) >= 0.9
    assert out.backward.ready


def test_broyden_reuse_costs_no_vjp_and_fallback_triggers():
    x, c = _data(5)

    def run(threshold):
        deq = DEQ(
            Cell(),
            solver="broyden",
            f_max_iter=60,
            tol=1e-10,
            backward="broyden_reuse",
            reuse_threshold=threshold,
        )
        return _grads(deq, x, c)

    jfb_w, _, _ = _grads(DEQ(Cell(), solver="broyden", f_max_iter=60, tol=1e-10, backward="jfb"), x, c)
    ift_w, _, _ = _grads(DEQ(Cell(), solver="broyden", f_max_iter=60, b_max_iter=100, tol=1e-10), x, c)
    # A tiny threshold: every sample's estimate is "too large", so all fall back to JFB exactly.
    gw, _, out = run(1e-6)
    assert out.backward.fallback.all() and out.backward.nfe == 0
    torch.testing.assert_close(gw, jfb_w)
    # A generous threshold: no fallback; the gradient is closer to IFT than JFB is.
    gw, _, out = run(100.0)
    assert not out.backward.fallback.any()
    assert (gw - ift_w).norm() < (jfb_w - ift_w).norm()


def test_phantom_and_jfb_backward_costs():
    x, c = _data()
    _, _, out = _grads(DEQ(Cell(), f_max_iter=30, b_max_iter=7, backward="phantom"), x, c)
    assert out.graph_evals == 7 and out.backward.nfe == 7
    _, _, out = _grads(DEQ(Cell(), f_max_iter=30, backward="jfb"), x, c)
    assert out.graph_evals == 1


def test_budget_override_per_call_and_eval_mode():
    x, _ = _data()
    deq = DEQ(Cell(rho=0.99), solver="anderson", f_max_iter=20, tol=1e-30)
    with torch.no_grad():
        out = deq(x, torch.zeros_like(x), f_max_iter=3)
        assert (out.forward.nfe == 3).all() and out.backward is None
        out = deq(x, torch.zeros_like(x))
        assert (out.forward.nfe == 20).all()
    assert deq.settings.f_max_iter == 20  # overrides do not stick


@pytest.mark.parametrize(
    "solver, torchdeq_solver",
    [("anderson", "anderson"), ("broyden", "broyden"), ("fixed_point", "fixed_point_iter")],
)
def test_parity_with_torchdeq(solver, torchdeq_solver):
    torchdeq = pytest.importorskip("torchdeq")
    x, c = _data(6)
    cell = Cell()
    ours_w, ours_x, out = _grads(
        DEQ(cell, solver=solver, f_max_iter=100, b_max_iter=100, tol=1e-11, stop_mode="abs"), x, c
    )
    ref = torchdeq.get_deq(
        core="indexing",
        ift=True,
        f_solver=torchdeq_solver,
        b_solver=torchdeq_solver,
        f_max_iter=100,
        b_max_iter=100,
        f_tol=1e-11,
        b_tol=1e-11,
        f_stop_mode="abs",
        b_stop_mode="abs",
    )
    xr = x.clone().requires_grad_(True)
    zs, _ = ref(lambda z: cell(z, xr), torch.zeros_like(xr))
    ref_w, ref_x = torch.autograd.grad((zs[-1] * c).sum(), [cell.W, xr])
    torch.testing.assert_close(out.z.detach(), zs[-1].detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ours_w, ref_w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours_x, ref_x, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "newton"}, "solver must be one of"),
        ({"backward": "implicit"}, "backward must be one of ift, phantom, jfb, broyden_reuse"),
        ({"f_max_iter": 0}, "f_max_iter must be an integer >= 1"),
        ({"b_max_iter": -1}, "b_max_iter must be an integer >= 1"),
        ({"tol": -1.0}, "f_tol must be a number > 0"),
        ({"stop_mode": "max"}, "stop_mode must be one of abs, rel"),
        ({"backward": "broyden_reuse", "solver": "anderson"}, "needs solver 'broyden'"),
        ({"solver_options": {"memory": 3}}, r"solver_options: unknown option\(s\) \['memory'\]"),
        ({"f_maxiter": 3}, r"unknown DEQ option\(s\) \['f_maxiter'\]"),
        ({"phantom_damping": 0.0}, "phantom_damping must be in"),
    ],
)
def test_bad_settings_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEQ(Cell(), **kwargs)


def test_bad_override_raises_at_call():
    deq = DEQ(Cell())
    x, _ = _data()
    with pytest.raises(ValueError, match="backward must be one of"):
        deq(x, torch.zeros_like(x), backward="fancy")


def test_settings_defaults_valid():
    assert DEQSettings().validate().backward_solver == "anderson"


def test_jacobian_regularizer_matches_exact_frobenius():
    torch.manual_seed(0)
    cell = Cell()
    x, _ = _data()
    z = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    fz = cell(z, x)
    est = float(jacobian_frobenius(fz, z, n_samples=4000, create_graph=False))
    exact = 0.0
    for b in range(B):
        jac = torch.autograd.functional.jacobian(lambda v, xb=x[b]: cell(v, xb), z[b].detach())
        exact += float((jac**2).sum()) / (B * D)
    assert abs(est - exact) / exact < 0.05


def test_jacobian_regularizer_is_differentiable_from_deq():
    x, c = _data()
    deq = DEQ(Cell(), f_max_iter=30, jac_reg_samples=2)
    out = deq(x, torch.zeros_like(x))
    assert out.jac_loss is not None and out.jac_loss.requires_grad
    (g,) = torch.autograd.grad(out.jac_loss, [deq.func.W])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_spectral_norm_estimate():
    w = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    est = spectral_norm_estimate(w, n_iter=200, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est, torch.linalg.matrix_norm(w, 2), rtol=1e-6, atol=0)


def test_broyden_reuse_with_residual_basis_factors():
    # With fewer evaluations than entries per sample, Broyden keeps its factors over its residual basis;
    # the reuse gradient must equal -Bᵀw formed from the explicit pair (U, V).
    d = 40
    g = torch.Generator().manual_seed(7)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = 0.6 * w / torch.linalg.matrix_norm(w, 2)

    class WideCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(w.clone())

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x)

    x = torch.randn(B, d, generator=g, dtype=torch.float64).requires_grad_(True)
    c = torch.randn(B, d, generator=g, dtype=torch.float64)
    cell = WideCell()
    deq = DEQ(
        cell, solver="broyden", f_max_iter=20, tol=1e-10, backward="broyden_reuse", reuse_threshold=100.0
    )
    out = deq(x, torch.zeros_like(x))
    (gx,) = torch.autograd.grad((out.z * c).sum(), [x])
    assert not out.backward.fallback.any()
    u, v = out.forward.broyden_factors
    adj = c - torch.einsum("bnd,bn->bd", v, torch.einsum("bnd,bd->bn", u, c))  # -Bᵀ c
    z = out.z.detach()
    (ref,) = torch.autograd.grad(cell(z, x), [x], adj)
    torch.testing.assert_close(gx, ref, rtol=1e-8, atol=1e-10)


# --- Solvers and backward modes from the registries ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Damped(Solver):
    """``z ← (1 - a) z + a f(z)``: a solver registered from a test."""

    a: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.a <= 1.0:
            raise ValueError(f"a must be in (0, 1] (got {self.a!r})")

    def step(self, state, k, z, fz, track, last):
        return None if last else torch.lerp(z, fz, self.a)


class _JFBOnFixedPoint(Backward):
    """A backward mode that declares the forward solver it needs (JFB's gradient, counted as one VJP)."""

    requires_solver = "fixed_point"

    def attach(self, step, z_in, fz, forward, settings, stats):
        stats.nfe, stats.ready = 1, True
        return fz, 1


@pytest.fixture
def registered():
    SOLVERS.register("damped", _Damped)
    BACKWARDS.register("jfb_fp", _JFBOnFixedPoint)
    yield
    SOLVERS.unregister("damped")
    BACKWARDS.unregister("jfb_fp")


def test_registered_solver_runs_a_deq_forward_and_backward(registered):
    x, c = _data()
    deq = DEQ(Cell(), solver="damped", f_max_iter=300, b_max_iter=300, tol=1e-13, stop_mode="abs")
    assert deq.settings.backward_solver == "damped"  # the adjoint uses the same solver by default
    gw, gx, out = _grads(deq, x, c)
    assert out.forward.converged.all() and out.backward.ready
    ref_w, ref_x = _unrolled_grads(Cell(), x, c)
    torch.testing.assert_close(gw, ref_w, rtol=1e-5, atol=1e-9)
    # Its options are checked like the built-ins' (names at construction, values by the solver object).
    with pytest.raises(ValueError, match=r"solver_options: unknown option\(s\) \['m'\]"):
        DEQ(Cell(), solver="damped", solver_options={"m": 3})
    with pytest.raises(ValueError, match="solver_options: a must be in"):
        DEQ(Cell(), solver="damped", solver_options={"a": 0.0})
    out = DEQ(Cell(), solver="damped", f_max_iter=7, solver_options={"a": 0.9})(x, torch.zeros_like(x))
    assert (out.forward.nfe == 7).all()
    with pytest.raises(ValueError, match="solver must be one of fixed_point, anderson, broyden, damped"):
        DEQ(Cell(), solver="newton")


def test_requires_solver_rule_is_read_from_the_backward_class(registered):
    assert required_solver("broyden_reuse") == BroydenReuse.requires_solver == "broyden"
    assert [required_solver(n) for n in ("ift", "phantom", "jfb")] == [None, None, None]
    assert required_solver("jfb_fp") == "fixed_point"
    with pytest.raises(ValueError, match="backward must be one of ift, phantom, jfb, broyden_reuse, jfb_fp"):
        required_solver("implicit")
    with pytest.raises(
        ValueError, match="backward 'jfb_fp' needs solver 'fixed_point' \\(got solver 'anderson'\\)"
    ):
        DEQSettings(backward="jfb_fp", solver="anderson").validate()
    with pytest.raises(
        ValueError, match="allowed backward modes for other solvers: ift, phantom, jfb, jfb_fp$"
    ):
        DEQSettings(backward="broyden_reuse", solver="fixed_point").validate()
    # With the solver it needs, the mode's own attach runs.
    x, c = _data()
    _, _, out = _grads(DEQ(Cell(), solver="fixed_point", backward="jfb_fp"), x, c)
    assert out.backward.ready and out.backward.nfe == 1 and out.graph_evals == 1
    out = DEQ(Cell(), solver="anderson")(x, torch.zeros_like(x), solver="fixed_point", backward="jfb_fp")
    assert out.backward.mode == "jfb_fp"
    with pytest.raises(ValueError, match="needs solver 'fixed_point'"):
        DEQ(Cell(), solver="fixed_point", backward="jfb_fp")(x, torch.zeros_like(x), solver="broyden")
