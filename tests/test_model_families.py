"""Model families: monotone DEQ (splitting), weight-tied models with sparse masks, potential DEQ."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedeq.config import ConfigError, load_config
from fedeq.data import load_dataset
from fedeq.deq import solve
from fedeq.models import build_model, num_parameters
from fedeq.models.mondeq import (
    ConvMonDEQ,
    ConvOperator,
    MonDEQ,
    MonotoneConv,
    MonotoneLinear,
    adjoint_map,
    monotone_margin,
    monotone_solve,
    splitting_map,
)
from fedeq.models.potential_deq import PotentialDEQ
from fedeq.models.tied import TiedMLP, make_masks
from fedeq.train import train_local

FAMILIES = ("mondeq", "conv_mondeq", "tied", "tied_sparse", "potential_deq", "lyadeq")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _check_fd(
    model: torch.nn.Module, loss_fn, n_dirs: int = 1, eps: float = 1e-6, rtol: float = 1e-5
) -> None:
    """Directional derivative of every parameter against central finite differences (float64)."""
    model.zero_grad()
    loss_fn().backward()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        for _ in range(n_dirs):
            v = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            with torch.no_grad():
                p.add_(eps * v)
                lp = float(loss_fn())
                p.sub_(2 * eps * v)
                lm = float(loss_fn())
                p.add_(eps * v)
            fd = (lp - lm) / (2 * eps)
            an = float((g * v).sum())
            assert _relative_error(an, fd) < rtol, (name, an, fd)


# ------------------------------------------------------------------------------------------------
# Monotone operator DEQ
# ------------------------------------------------------------------------------------------------


def test_monotone_parametrization_has_margin_m_for_any_weights():
    torch.manual_seed(0)
    for m in (0.05, 0.3, 1.0):
        lin = MonotoneLinear(12, m, init_scale=3.0).double()
        assert float(monotone_margin(lin.weight().detach())) >= m - 1e-9
    with pytest.raises(ValueError, match="monotone_m"):
        MonotoneLinear(4, 0.0)


@pytest.mark.parametrize("splitting", ["fb", "pr"])
def test_splittings_reach_the_same_fixed_point_from_different_initial_points(splitting):
    torch.manual_seed(1)
    lin = MonotoneLinear(10, 0.5, init_scale=1.0).double()
    W = lin.weight().detach()
    inj = torch.randn(5, 10, dtype=torch.float64)
    starts = [torch.zeros(5, 10), 5 * torch.randn(5, 10), 10 * torch.rand(5, 10)]
    sols = []
    for z0 in starts:
        z, st = monotone_solve(
            W,
            inj,
            z0.double(),
            splitting=splitting,
            margin=0.5,
            max_iter=5000,
            tol=1e-13,
            solver="fixed_point",
        )
        assert bool(st.converged.all())
        assert float((F.relu(z @ W.T + inj) - z).norm(dim=1).max()) < 1e-10
        sols.append(z)
    for z in sols[1:]:
        torch.testing.assert_close(z, sols[0], atol=1e-9, rtol=0)
    other = "pr" if splitting == "fb" else "fb"
    z_other, _ = monotone_solve(W, inj, splitting=other, margin=0.5, max_iter=5000, tol=1e-13)
    torch.testing.assert_close(z_other, sols[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("splitting", ["fb", "pr"])
def test_adjoint_splitting_solves_the_dense_linear_system(splitting):
    torch.manual_seed(2)
    d = 9
    W = MonotoneLinear(d, 0.4).double().weight().detach()
    y = torch.randn(4, d, dtype=torch.float64)
    dmask = (y > 0).double()
    w = torch.randn(4, d, dtype=torch.float64)
    alpha = 1.0 if splitting == "pr" else 0.4 / float(torch.linalg.matrix_norm(torch.eye(d) - W, 2)) ** 2
    T, read = adjoint_map(W, dmask, w, splitting, alpha)
    u, st = solve(T, torch.zeros_like(w), "fixed_point", 20000, 1e-14, "abs")
    x = read(u)
    for i in range(4):  # x = D (I - Wᵀ D)⁻¹ w
        D = torch.diag(dmask[i])
        ref = D @ torch.linalg.solve(torch.eye(d, dtype=torch.float64) - W.T @ D, w[i])
        torch.testing.assert_close(x[i], ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("splitting", "solver", "m"),
    [("pr", "fixed_point", 0.3), ("pr", "broyden", 0.3), ("fb", "anderson", 0.9)],
)
def test_mondeq_gradients_match_finite_differences(splitting, solver, m):
    torch.manual_seed(3)
    model = MonDEQ(
        7,
        3,
        hidden=6,
        monotone_m=m,
        splitting=splitting,
        solver=solver,
        f_max_iter=3000,
        b_max_iter=3000,
        tol=1e-13,
        stop_mode="abs",
    ).double()
    x = torch.randn(5, 7, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])

    def loss():
        return F.cross_entropy(model(x).logits, y)

    _check_fd(model, loss, n_dirs=2)
    out = model(x)
    F.cross_entropy(out.logits, y).backward()
    assert out.deq.backward.ready and float(out.deq.backward.rel_residual.max()) < 1e-8


def test_mondeq_margin_holds_after_training_steps(digits):
    torch.manual_seed(4)
    model = MonDEQ(64, 10, hidden=16, monotone_m=0.2, solver="anderson", f_max_iter=8, b_max_iter=8)
    train_local(model, digits.x_train[:400], digits.y_train[:400], epochs=2, lr=0.05, batch_size=32)
    W = model.mon.weight().detach().double()
    assert float(monotone_margin(W)) >= 0.2 - 1e-5
    assert float(model.mon.m) == pytest.approx(0.2)


def test_mondeq_budgets_are_exact_and_statistics_reported():
    torch.manual_seed(5)
    model = MonDEQ(8, 3, hidden=10, tol=1e-12, solver="fixed_point", f_max_iter=30, b_max_iter=30)
    x = torch.randn(4, 8)
    for k in (1, 3, 7):
        out = model(x, f_max_iter=k, b_max_iter=k - 1 or 1, backward="ift")
        assert out.deq.forward.nfe.tolist() == [k] * 4
        out.logits.sum().backward()
        assert 1 <= out.deq.backward.nfe <= (k - 1 or 1)
        assert out.deq.forward.rel_residual.shape == (4,)
    # One application of the splitting map is returned for a budget of 1, never the initial guess.
    with torch.no_grad():
        out = model(x, f_max_iter=1)
        W, inj = model.mon.weight(), model.inject(x)
        T, read = splitting_map(W, inj, "pr", 1.0)
        torch.testing.assert_close(out.deq.z, read(T(torch.zeros_like(inj))))
    with pytest.raises(ValueError, match="splitting"):
        model(x, splitting="dr")
    with pytest.raises(ValueError, match="unknown DEQ option"):
        model(x, f_max_iters=3)


def test_mondeq_monotone_m_travels_in_the_state_dict():
    a = MonDEQ(8, 3, hidden=6, monotone_m=0.7)
    b = MonDEQ(8, 3, hidden=6, monotone_m=0.1)
    assert "mon.m" in a.state_dict()
    b.load_state_dict(a.state_dict())
    assert float(b.mon.m) == pytest.approx(0.7)


def _dense_matrix(op: ConvOperator, shape: tuple[int, ...], transpose: bool = False) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    cols = (op.apply_t if transpose else op.apply)(basis).reshape(n, n)
    return cols.T


def test_conv_operator_is_the_circular_convolution_and_strongly_monotone():
    torch.manual_seed(12)
    K = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    z = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    K_hat = ConvOperator.kernel_fft(K, 5, 6)
    ref = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), K)
    torch.testing.assert_close(ConvOperator(K_hat, 6).apply(z), ref)
    mon = MonotoneConv(3, 0.3, init_scale=3.0).double()
    op = mon.operator(z).detach()
    W = _dense_matrix(op, (3, 5, 6))
    torch.testing.assert_close(_dense_matrix(op, (3, 5, 6), transpose=True), W.T)
    G = torch.eye(W.shape[0], dtype=torch.float64) - W
    dense_margin = float(torch.linalg.eigvalsh(0.5 * (G + G.T))[0])
    assert dense_margin >= 0.3 - 1e-9
    assert float(op.margin()) == pytest.approx(dense_margin, abs=1e-9)


@pytest.mark.parametrize("splitting", ["fb", "pr"])
def test_conv_splittings_agree_with_each_other_and_the_dense_adjoint(splitting):
    torch.manual_seed(13)
    shape = (2, 4, 4)
    op = MonotoneConv(2, 0.5).double().operator(torch.zeros(1, *shape)).detach()
    inj = torch.randn(3, *shape, dtype=torch.float64)
    z, st = monotone_solve(
        op, inj, splitting=splitting, margin=0.5, solver="anderson", max_iter=3000, tol=1e-13
    )
    assert bool(st.converged.all())
    torch.testing.assert_close(F.relu(op.apply(z) + inj), z, atol=1e-10, rtol=0)
    z_ref, _ = monotone_solve(op, inj, splitting="pr", solver="anderson", max_iter=3000, tol=1e-13)
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    W = _dense_matrix(op, shape)
    y = (op.apply(z) + inj).reshape(3, -1)
    w = torch.randn(3, *shape, dtype=torch.float64)
    alpha = 1.0 if splitting == "pr" else 0.5 / float(op.lipschitz()) ** 2
    T, read = adjoint_map(op, (y > 0).double().reshape(w.shape), w, splitting, alpha)
    x = read(solve(T, torch.zeros_like(w), "anderson", 3000, 1e-14, "abs")[0]).reshape(3, -1)
    for i in range(3):
        D = torch.diag((y[i] > 0).double())
        ref = D @ torch.linalg.solve(torch.eye(W.shape[0], dtype=torch.float64) - W.T @ D, w[i].flatten())
        torch.testing.assert_close(x[i], ref, atol=1e-8, rtol=0)


def test_conv_mondeq_gradients_match_finite_differences():
    torch.manual_seed(14)
    model = ConvMonDEQ(
        1, 3, channels=3, solver="anderson", f_max_iter=2000, b_max_iter=2000, tol=1e-13, stop_mode="abs"
    ).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    _check_fd(model, lambda: F.cross_entropy(model(x).logits, y))


# ------------------------------------------------------------------------------------------------
# Weight-tied models with distinct sparse masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "row"])
def test_masks_are_distinct_exact_density_and_seeded(pattern):
    masks = make_masks(20, 4, 0.25, pattern, seed=7)
    assert masks.shape == (4, 20, 20)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    for layer in range(4):
        assert float(masks[layer].mean()) == pytest.approx(0.25)
        for other in range(layer):
            assert not torch.equal(masks[layer], masks[other])
    torch.testing.assert_close(masks, make_masks(20, 4, 0.25, pattern, seed=7))
    assert not torch.equal(masks, make_masks(20, 4, 0.25, pattern, seed=8))
    if pattern == "row":
        assert set(masks[0].sum(dim=1).unique().tolist()) == {0.0, 20.0}
    torch.testing.assert_close(make_masks(5, 2, 1.0, pattern, 0), torch.ones(2, 5, 5))


def test_tied_masks_do_not_travel_and_are_rebuilt_from_the_loaded_seed():
    torch.manual_seed(6)
    src = TiedMLP(16, 4, hidden=12, depth=3, mask_density=0.25, mask_pattern="row", mask_seed=3)
    dst = TiedMLP(16, 4, hidden=12, depth=3, mask_density=0.5, mask_seed=0)
    state = src.state_dict()
    assert "masks" not in state
    assert {"mask_seed", "mask_density", "mask_pattern"} <= set(state)
    trained = {k: v for k, v in state.items() if not k.startswith("mask_")}
    assert sum(v.numel() for v in trained.values()) == num_parameters(src)
    dst.load_state_dict(state)
    torch.testing.assert_close(dst.masks, src.masks)
    assert dst.mask_spec == (0.25, "row", 3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(dst(x).logits, src(x).logits)


def test_tied_mask_buffers_survive_aggregation_round_off():
    model = TiedMLP(8, 3, hidden=6, depth=2, mask_density=1.0, mask_seed=5)
    state = model.state_dict()
    # What a weighted average accumulated in float64 can hand back for equal values.
    state["mask_density"] = torch.tensor(1.0000000000000002, dtype=torch.float64)
    model.load_state_dict(state)
    assert model.mask_spec == (1.0, "unstructured", 5)
    sparse = TiedMLP(8, 3, hidden=6, depth=2, mask_density=0.3)
    state = sparse.state_dict()
    state["mask_density"] = torch.tensor(0.30000000000000004, dtype=torch.float64)
    sparse.load_state_dict(state)
    assert sparse.mask_spec[0] == pytest.approx(0.3)
    assert float(sparse.masks[0].ne(0).float().mean()) == pytest.approx(round(0.3 * 36) / 36)


def test_tied_forward_budget_caps_the_number_of_layers():
    torch.manual_seed(7)
    deep = TiedMLP(10, 3, hidden=8, depth=6, mask_density=0.5, mask_seed=2)
    x = torch.randn(4, 10)
    for k in (1, 2, 4):
        shallow = TiedMLP(10, 3, hidden=8, depth=k, mask_density=0.5, mask_seed=2)
        shallow.load_state_dict(deep.state_dict())
        with torch.no_grad():
            out = deep(x, f_max_iter=k)
            torch.testing.assert_close(out.logits, shallow(x).logits)
        assert out.deq.forward.nfe.tolist() == [k] * 4
    with torch.no_grad():
        assert deep(x, f_max_iter=50).deq.forward.nfe.tolist() == [6] * 4


def test_tied_backward_budget_truncates_backpropagation():
    torch.manual_seed(8)
    model = TiedMLP(10, 3, hidden=8, depth=4, mask_density=0.5).double()
    x = torch.randn(6, 10, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def grads(**kw):
        model.zero_grad()
        out = model(x, **kw)
        F.cross_entropy(out.logits, y).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    _check_fd(model, lambda: F.cross_entropy(model(x).logits, y), rtol=1e-6)
    out_full, full = grads(b_max_iter=4)
    assert out_full.deq.backward.nfe == 4
    out_one, one = grads(b_max_iter=1)
    assert out_one.deq.backward.nfe == 1
    out_jfb, jfb = grads(backward="jfb", b_max_iter=4)
    assert out_jfb.deq.backward.nfe == 1
    assert all(torch.equal(a, b) for a, b in zip(one, jfb, strict=True))
    assert not torch.allclose(full[2], one[2])  # the shared weight sees fewer layers


# ------------------------------------------------------------------------------------------------
# Potential DEQ (gradient step on a learned strongly convex potential)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_potential(digits):
    torch.manual_seed(9)
    model = PotentialDEQ(64, 10, hidden=24, solver="anderson", f_max_iter=10, b_max_iter=8)
    for epoch in range(2):
        train_local(model, digits.x_train, digits.y_train, epochs=1, lr=0.01, batch_size=64, seed=epoch)
    return model


def _trajectory(model: PotentialDEQ, ctx, solver: str, steps: int, eta_scale: float = 1.0) -> torch.Tensor:
    """``V`` at every point where the solver evaluated the cell, shape (steps, B)."""
    u, a, c, w, eta = ctx
    ctx = (u, a, c, w, eta * eta_scale)
    points = []

    def f(z):
        points.append(z.clone())
        return model.deq.func(z, ctx)

    solve(f, torch.zeros_like(u), solver, steps, 1e-300, "abs")
    return torch.stack([model.lyapunov(z, ctx) for z in points])


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_lyapunov_function_decreases_along_the_solver_trajectory_on_test_inputs(
    trained_potential, digits, solver
):
    model = trained_potential.double()
    try:
        x = torch.tensor(digits.x_test[:120], dtype=torch.float64)
        with torch.no_grad():
            ctx = model.context(x)
            V = _trajectory(model, ctx, solver, 25)
            assert float(V[0].sub(V[-1]).min()) > 0
            increase = V[1:] - V[:-1]
            assert float(increase.max()) <= 1e-9 * float(V.abs().max())
            # The equilibrium minimizes V: V(z) - V(z*) ≥ ½||z - z*||² (1-strong convexity) at z = 0.
            z_star = model.equilibrium(x, f_max_iter=200, tol=1e-12)[0].z
            assert float(model.lyapunov_grad(z_star, ctx).norm(dim=1).max()) < 1e-8
            zero = torch.zeros_like(z_star)
            gap = model.lyapunov(zero, ctx) - model.lyapunov(z_star, ctx)
            assert bool((gap >= 0.5 * z_star.pow(2).sum(dim=1) - 1e-9).all())
            # Negative control: a step beyond 2/L breaks the decrease, so the check above can fail.
            V_bad = _trajectory(model, ctx, "fixed_point", 10, eta_scale=4.5)
            assert float((V_bad[1:] - V_bad[:-1]).max()) > 0
    finally:
        model.float()


def test_orthogonal_head_stays_orthogonal_after_training_and_averaging(trained_potential, digits):
    model = trained_potential
    q = model.orth.weight.detach()
    torch.testing.assert_close(q @ q.T, torch.eye(10), atol=1e-5, rtol=0)
    other = PotentialDEQ(64, 10, hidden=24)
    other.load_state_dict(model.state_dict())
    train_local(other, digits.x_train[:300], digits.y_train[:300], epochs=1, lr=0.05, seed=5)
    # FedAvg of two clients' arrays (the unconstrained parametrization) is still orthogonal.
    avg = {k: (v + other.state_dict()[k]) / 2 for k, v in model.state_dict().items()}
    merged = PotentialDEQ(64, 10, hidden=24)
    merged.load_state_dict(avg)
    q = merged.orth.weight.detach()
    torch.testing.assert_close(q @ q.T, torch.eye(10), atol=1e-5, rtol=0)


def test_potential_deq_gradients_match_finite_differences():
    torch.manual_seed(10)
    model = PotentialDEQ(
        6,
        3,
        hidden=5,
        icnn_width=4,
        f_max_iter=400,
        b_max_iter=400,
        tol=1e-13,
        stop_mode="abs",
        solver="anderson",
    ).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    _check_fd(model, lambda: F.cross_entropy(model(x).logits, y), n_dirs=2)


# ------------------------------------------------------------------------------------------------
# Registry, config, budgets
# ------------------------------------------------------------------------------------------------


class _Cfg:
    hidden = 16
    channels = 4
    depth = 4
    monotone_m = 0.25
    mask_density = 0.3
    mask_pattern = "row"
    mask_seed = 11


@pytest.mark.parametrize("name", FAMILIES)
def test_families_honour_per_call_budgets_and_report_solver_statistics(name):
    torch.manual_seed(11)
    model = build_model(name, (1, 8, 8), 10, _Cfg(), solver="anderson", f_max_iter=12, b_max_iter=6)
    x = torch.randn(7, 1, 8, 8)
    for solver, k, kb, backward in [
        ("fixed_point", 2, 2, "jfb"),
        ("anderson", 3, 2, "phantom"),
        ("broyden", 5, 3, "ift"),
        ("broyden", 4, 2, "broyden_reuse"),
    ]:
        model.zero_grad()
        out = model(x, solver=solver, f_max_iter=k, b_max_iter=kb, backward=backward, tol=1e-9)
        assert out.logits.shape == (7, 10)
        st = out.deq.forward
        assert st.nfe.shape == (7,) and int(st.nfe.max()) <= k
        assert st.rel_residual.shape == (7,) and bool(torch.isfinite(st.rel_residual).all())
        out.logits.logsumexp(dim=1).sum().backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        b = out.deq.backward
        assert b.ready or backward == "jfb"
        assert b.nfe <= kb
    with torch.no_grad():
        out = model(x, f_max_iter=1)
    assert int(out.deq.forward.nfe.max()) == 1


def test_config_selects_families_and_validates_their_knobs():
    for name in FAMILIES:
        cfg = load_config(None, [f"model.name={name}", "model.hidden=16"])
        model = build_model(cfg.model.name, (1, 8, 8), 10, cfg.model)
        assert num_parameters(model) > 0
    cfg = load_config(None, ["model.name=tied_sparse", "model.mask_density=0.2", "model.mask_seed=4"])
    model = build_model(cfg.model.name, (1, 8, 8), 10, cfg.model)
    assert model.mask_spec == (pytest.approx(0.2), "unstructured", 4)
    cfg = load_config(None, ["model.name=mondeq", "model.monotone_m=0.5"])
    assert float(build_model("mondeq", (1, 8, 8), 10, cfg.model).mon.m) == pytest.approx(0.5)
    for bad in (
        "model.monotone_m=0",
        "model.mask_density=1.5",
        "model.mask_pattern=block",
        "model.mask_seed=-1",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mondeq", "conv_mondeq", "tied_sparse", "lyadeq"])
def test_family_runs_federated_through_the_apps(name, tmp_path):
    import pandas as pd

    from fedeq.engines.simulate import simulate

    cfg = load_config(
        "simulations/configs/quick.yaml",
        [f"model.name={name}", "rounds=1", f"output_dir={tmp_path}", "model.mask_density=0.25"],
    )
    out = simulate(cfg, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    clients = pd.read_csv(out / "clients.csv")
    assert (clients["status"] == "ok").all() and len(clients) == 4
    budgets = {t.name: t.f_max_iter for t in cfg.devices.tiers}
    for _, row in clients.iterrows():
        assert 0 < row["nfe_fwd"] <= budgets[row["tier"]] + 1
    model = build_model(name, (1, 8, 8), 10, cfg.model)
    if name == "tied_sparse":  # masks stay home: bytes per round ≈ 4 bytes per trained weight
        assert summary["model_bytes"] < 4 * num_parameters(model) + 4096
