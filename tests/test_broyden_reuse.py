"""The ``broyden_reuse`` backward: factors at the returned iterate, adjoint-secant updates, refinement."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedeq.deq import DEQ
from fedeq.deq.solvers import Broyden, OuterGradient, Tracker, broyden_transpose_apply, solve
from fedeq.deq.solvers.broyden_explicit import ExplicitBroydenState
from fedeq.models import MLPDEQ, PotentialDEQ
from fedeq.train.local import train_local

D, B = 12, 5


class Cell(nn.Module):
    """``tanh(W z + x)`` with ``||W||₂ = rho``."""

    def __init__(self, rho: float, seed: int = 0, d: int = D) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(rho * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x)


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    return x, c


def _input_grad(deq: DEQ, x: torch.Tensor, c: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = deq(x, torch.zeros_like(x))
    (gx,) = torch.autograd.grad((out.z * c).sum(), [x])
    return gx, out


def _exact_input_grad(cell: Cell, z: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Dense reference: ``(∂f/∂x)ᵀ (I - J_f)^{-T} c`` per sample."""
    rows = []
    for b in range(B):
        jac = torch.autograd.functional.jacobian(lambda v, xb=x[b]: cell(v, xb), z[b])
        adj = torch.linalg.solve(torch.eye(D, dtype=z.dtype) - jac.T, c[b])
        rows.append((1 - torch.tanh(z[b] @ cell.W.T + x[b]) ** 2) * adj)  # ∂f/∂x = diag(1 - tanh²)
    return torch.stack(rows)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1).min()


def test_secant_updates_beat_jfb_and_plain_reuse_against_dense_solve():
    cell = Cell(rho=0.6)
    x, c = _data()
    common = dict(solver="broyden", f_max_iter=40, tol=1e-10)
    gx_jfb, out = _input_grad(DEQ(cell, backward="jfb", **common), x, c)
    exact = _exact_input_grad(cell, out.z.detach(), x, c)

    def reuse(**opts):
        deq = DEQ(cell, backward="broyden_reuse", reuse_threshold=100.0, **common, **opts)
        gx, o = _input_grad(deq, x, c)
        assert not o.backward.fallback.any() and o.backward.nfe == opts.get("reuse_updates", 0)
        return (gx - exact).norm(dim=1) / exact.norm(dim=1), _cos(gx, exact)

    err_jfb = (gx_jfb - exact).norm(dim=1) / exact.norm(dim=1)
    err0, _ = reuse()
    err1, _ = reuse(reuse_updates=1, reuse_direction="outer")
    err2, cos2 = reuse(reuse_updates=2)
    err6, cos6 = reuse(reuse_updates=6)
    assert (err2 < err_jfb).all() and cos2 > _cos(gx_jfb, exact)
    assert err1.mean() < err0.mean() and err2.mean() < err0.mean()
    assert (err6 < 1e-3).all() and cos6 > 1 - 1e-6  # quasi-Newton on the adjoint system: converges


def test_refine_with_enough_budget_matches_ift():
    cell = Cell(rho=0.6)
    x, c = _data()
    common = dict(solver="broyden", f_max_iter=40, tol=1e-12, b_max_iter=80)
    gx_ift, _ = _input_grad(DEQ(cell, backward="ift", **common), x, c)
    gx, out = _input_grad(DEQ(cell, backward="broyden_reuse", reuse_refine_iter=80, **common), x, c)
    torch.testing.assert_close(gx, gx_ift, rtol=1e-8, atol=1e-10)
    assert 0 < out.backward.nfe <= 80 and float(out.backward.rel_residual.max()) <= 1e-12
    # The refinement starts from the estimate: with updates first it needs fewer iterations.
    _, warm = _input_grad(
        DEQ(cell, backward="broyden_reuse", reuse_updates=3, reuse_refine_iter=80, **common), x, c
    )
    assert warm.backward.nfe - 3 < out.backward.nfe


@dataclass(frozen=True, kw_only=True)
class _ExplicitBroyden(Broyden):
    """Broyden that keeps its factors explicitly, with memory for every update."""

    def init(self, z, max_iter):
        return ExplicitBroydenState(z, max(max_iter - 1, 1))


@pytest.mark.parametrize("solver", [Broyden(keep_trace=True), _ExplicitBroyden(keep_trace=True)])
def test_factors_are_those_of_the_returned_iterate(solver, monkeypatch):
    # A non-contractive map on which Broyden's residual rises at the last evaluation for some samples.
    d, K = 6, 4
    g = torch.Generator().manual_seed(4)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = 2.5 * w / torch.linalg.matrix_norm(w, 2)
    c = torch.randn(3, d, generator=g, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ w.T + c)

    def run(max_iter):
        return solve(f, torch.zeros_like(c), solver, max_iter=max_iter, tol=1e-30, stop_mode="abs")

    _, st = run(K)
    best = torch.stack(st.trace).argmin(dim=0)
    assert best.tolist() == [2, 2, 3]  # the returned candidates of samples 0, 1 are not the last ones
    v = torch.randn(3, d, generator=g, dtype=torch.float64)
    got = broyden_transpose_apply(st.broyden_factors, v)
    for b, k in enumerate(best.tolist()):
        _, at_best = run(k + 1)  # the solve that ends at the returned evaluation
        expected = broyden_transpose_apply(at_best.broyden_factors, v)
        torch.testing.assert_close(got[b], expected[b], rtol=1e-10, atol=1e-12)
    # The factors after the last update differ for samples 0 and 1 (the check above could fail).
    monkeypatch.setattr(Tracker, "best_index", lambda self: torch.full((3,), self.k - 1))
    _, last = run(K)
    moved = (broyden_transpose_apply(last.broyden_factors, v) - got).norm(dim=1)
    assert (moved[:2] > 1e-3).all() and moved[2] == 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"reuse_updates": -1}, "reuse_updates must be an integer >= 0"),
        ({"reuse_updates": 1.5}, "reuse_updates must be an integer >= 0"),
        ({"reuse_refine_iter": True}, "reuse_refine_iter must be an integer >= 0"),
        ({"reuse_direction": "loss"}, "reuse_direction must be one of adjoint, outer"),
        ({"reuse_threshold": 0.0}, "reuse_threshold must be > 0"),
        ({"reuse_opa_every": -1}, "reuse_opa_every must be an integer >= 0"),
    ],
)
def test_reuse_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        DEQ(Cell(rho=0.5), solver="broyden", backward="broyden_reuse", **options)
    deq = DEQ(Cell(rho=0.5), solver="broyden", backward="broyden_reuse")
    with pytest.raises(ValueError, match=message):
        deq(*_data(), **options)  # per-call overrides are checked the same way


def test_default_threshold_is_the_reference_value():
    assert DEQ(Cell(rho=0.5)).settings.reuse_threshold == 1.8


# --- Outer-problem awareness (SHINE's OPA): extra adjoint-secant updates inside the forward solve ---


def test_opa_updates_happen_at_the_expected_evaluations():
    cell = Cell(rho=0.9)
    x, c = _data()
    evals, vjps, grad_at = [0], [0], []

    def f(z):
        evals[0] += 1
        out = cell(z, x)
        if out.requires_grad:  # only the evaluations that an outer update differentiates
            out.register_hook(lambda v: vjps.__setitem__(0, vjps[0] + 1))
        return out

    def outer_grad(z):
        grad_at.append(evals[0])
        return c - z  # any per-sample vector field will do

    for max_iter, expected in [(20, [6, 11, 16]), (16, [6, 11])]:  # never after the last evaluation
        evals[0], vjps[0], grad_at[:] = 0, 0, []
        outer = OuterGradient(outer_grad, every=5)
        _, st = solve(f, torch.zeros_like(x), "broyden", max_iter, 1e-30, "abs", outer=outer)
        assert grad_at == expected and vjps[0] == len(expected) == st.vjps and evals[0] == max_iter
    evals[0], grad_at[:] = 0, []
    _, st = solve(f, torch.zeros_like(x), "broyden", 8, 1e-30, "abs", outer=OuterGradient(outer_grad, 1))
    assert grad_at == [3, 4, 5, 6, 7] and st.vjps == 5  # every evaluation k > 1 but the last
    with pytest.raises(ValueError, match="reuse_opa_every needs solver='broyden'"):
        solve(f, torch.zeros_like(x), "anderson", 8, 1e-6, "abs", outer=OuterGradient(outer_grad, 5))


def _mlp_case(seed: int = 0):
    torch.manual_seed(seed)
    model = MLPDEQ(16, 5, hidden=24, contraction=0.7, solver="broyden", f_max_iter=20, tol=1e-10)
    model = model.double().eval()  # eval: the spectral rescaling stays put between calls
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=g)
    return model, x, y


def _param_grad(model, x, y, **settings):
    params = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    model.zero_grad(set_to_none=True)
    out = model(x, targets=y, **settings)
    F.cross_entropy(out.logits, y).backward()
    return torch.cat([p.grad.flatten() for p in params]), out


def _exact_param_grad(model, x, y):
    """The gradient of the injection and cell parameters with the adjoint from a dense solve."""
    params = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    c = model.injection(x)
    with torch.no_grad():
        z = model.deq(c, model.init_state(c), tol=1e-14, f_max_iter=60).z
    z_in = z.detach().requires_grad_(True)
    fz = model.cell(z_in, c)
    z_out = fz.detach().requires_grad_(True)
    (w,) = torch.autograd.grad(F.cross_entropy(model.readout(z_out), y), [z_out])
    jac = torch.autograd.functional.jacobian(lambda v: model.cell(v, c).sum(0), z_in).permute(1, 0, 2)
    eye = torch.eye(w.shape[1], dtype=w.dtype)
    adjoint = torch.linalg.solve(eye - jac.mT, w.unsqueeze(-1)).squeeze(-1)
    return torch.cat([g.flatten() for g in torch.autograd.grad(fz, params, adjoint)])


def test_reuse_with_opa_beats_jfb_and_plain_reuse_on_a_well_conditioned_mlp():
    model, x, y = _mlp_case()
    exact = _exact_param_grad(model, x, y)

    def quality(**settings):
        g, out = _param_grad(model, x, y, **settings)
        return float(F.cosine_similarity(g, exact, dim=0)), float((g - exact).norm() / exact.norm()), out

    cos_jfb, err_jfb, _ = quality(backward="jfb")
    cos_reuse, err_reuse, plain = quality(backward="broyden_reuse", reuse_threshold=float("inf"))
    cos_opa, err_opa, out = quality(backward="broyden_reuse", reuse_threshold=float("inf"), reuse_opa_every=5)
    assert out.deq.forward.vjps == 3 and plain.deq.forward.vjps == 0
    assert cos_opa > cos_reuse > cos_jfb and err_opa < err_reuse < err_jfb
    assert err_opa < 0.5 * err_reuse and cos_opa > 0.99
    # With the default fallback threshold nothing falls back here: the same gradient.
    cos_fb, err_fb, out_fb = quality(backward="broyden_reuse", reuse_opa_every=5)
    assert not out_fb.deq.backward.fallback.any() and err_fb == pytest.approx(err_opa, rel=1e-9)
    # Without targets (or with gradients off) the forward makes no outer update.
    with torch.no_grad():
        assert model(x, targets=y, backward="broyden_reuse", reuse_opa_every=5).deq.forward.vjps == 0
    no_targets = model(x, backward="broyden_reuse", reuse_opa_every=5)
    assert no_targets.deq.forward.vjps == 0 and no_targets.logits.requires_grad


def test_opa_leaves_the_fixed_point_unchanged():
    model, x, y = _mlp_case(seed=1)
    _, plain = _param_grad(model, x, y, backward="broyden_reuse")
    _, opa = _param_grad(model, x, y, backward="broyden_reuse", reuse_opa_every=2)
    assert opa.deq.forward.vjps > 0 and bool(opa.deq.forward.converged.all())
    assert float(opa.deq.forward.rel_residual.max()) <= 1e-10
    torch.testing.assert_close(opa.deq.z, plain.deq.z, rtol=0, atol=1e-8)
    torch.testing.assert_close(opa.logits, plain.logits, rtol=0, atol=1e-8)


def test_training_with_opa_passes_targets_and_charges_the_vjps():
    model, x, y = _mlp_case(seed=2)
    model, x = model.float().train(), x.float()
    opts = dict(backward="broyden_reuse", reuse_opa_every=5, tol=1e-30, f_max_iter=12)
    st = train_local(model, x, y, epochs=1, batch_size=8, deq=opts)
    assert st.steps == 1 and st.nfe_fwd == 12 + 1 + 2  # solver + graphed evaluation + 2 outer VJPs


def test_a_model_without_targets_refuses_opa():
    torch.manual_seed(0)
    model = PotentialDEQ(16, 5, hidden=8, solver="broyden", backward="broyden_reuse", reuse_opa_every=5)
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match=r"reuse_opa_every=5 needs .*targets=.*PotentialDEQ does not"):
        train_local(model, x, y, epochs=1, batch_size=8)
    train_local(model, x, y, epochs=1, batch_size=8, deq={"reuse_opa_every": 0})  # off: trains
