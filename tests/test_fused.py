"""The fused CPU steps (fedeq._fused) against the solvers' PyTorch code, which is the reference."""

import os
from collections.abc import Callable

import pytest
import torch

from fedeq.deq.solvers import core as solvers
from fedeq.deq.solvers.core import BroydenFactors, broyden_transpose_apply, fused_available, set_fused, solve

requires_fused = pytest.mark.skipif(not fused_available(), reason="fedeq._fused is not built")


def test_extension_is_built():
    # `pip install -e .` builds it on any machine with a C compiler (CI included): a silent fallback to
    # the PyTorch path would hide a broken build behind slower solves. Not skipped: set FEDEQ_REQUIRE_FUSED=0
    # to run the suite on a machine without a compiler.
    if os.environ.get("FEDEQ_REQUIRE_FUSED", "1") == "0":
        pytest.skip("FEDEQ_REQUIRE_FUSED=0")
    assert fused_available()


def _run(fused: bool, f: Callable, z0: torch.Tensor, name: str, **kw):
    previous = set_fused(fused)
    try:
        calls = []

        def counted(z):
            calls.append(1)
            return f(z)

        z, st = solve(counted, z0, name, **kw)
        return z, st, len(calls)
    finally:
        set_fused(previous)


def _problem(b: int, d: int, dtype: torch.dtype, rho: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = (rho * w / torch.linalg.matrix_norm(w, 2)).to(dtype)
    c = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    # Per-sample scales make samples converge after different numbers of evaluations.
    scale = torch.linspace(0.05, 3.0, b, dtype=torch.float64).to(dtype)[:, None]
    return lambda z: torch.tanh(z @ w.T + scale * c)


def _assert_same(fused, ref, dtype, factors: bool = False):
    z, st, calls = fused
    zr, sr, calls_r = ref
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    assert calls == calls_r
    assert torch.equal(st.nfe, sr.nfe)
    assert torch.equal(st.converged, sr.converged)
    assert torch.equal(st.diverged, sr.diverged)
    torch.testing.assert_close(z, zr, **tol)
    torch.testing.assert_close(st.abs_residual, sr.abs_residual, **tol)
    torch.testing.assert_close(st.rel_residual, sr.rel_residual, **tol)
    if factors:
        ftol = dict(rtol=1e-7, atol=1e-9)
        w = torch.randn(z.shape[0], z[0].numel(), dtype=dtype, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(
            broyden_transpose_apply(st.broyden_factors, w),
            broyden_transpose_apply(sr.broyden_factors, w),
            **ftol,
        )


CASES = [
    ("fixed_point", {}),
    ("fixed_point", {"damping": 0.6}),
    ("anderson", {"m": 5}),
    ("anderson", {"m": 3, "beta": 0.7}),
    ("anderson", {"m": 8, "lam": 1e-2}),
    ("broyden", {}),
]


@requires_fused
@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("tol", [1e-30, 1e-5])
def test_fused_matches_pytorch_path(name, options, dtype, stop_mode, tol):
    f = _problem(b=9, d=40, dtype=dtype, rho=0.9, seed=1)
    z0 = torch.zeros(9, 40, dtype=dtype)
    # float32 solves with the whole budget stop before they reach round-off, where which step first hits
    # an exactly zero residual is up to round-off.
    max_iter = 8 if dtype == torch.float32 and tol < 1e-20 else 25
    kw = dict(max_iter=max_iter, tol=tol, stop_mode=stop_mode, keep_trace=True, **options)
    fused, ref = _run(True, f, z0, name, **kw), _run(False, f, z0, name, **kw)
    # Factors are compared where the steps stay above round-off (past it, u = (Δz - BΔg) / (Δzᵀ B Δg)
    # amplifies round-off differences arbitrarily).
    _assert_same(fused, ref, dtype, factors=name == "broyden" and dtype == torch.float64 and tol > 1e-20)
    if tol == 1e-5 and dtype == torch.float64:  # some samples stopped early, others ran on
        assert fused[1].nfe.min() < fused[1].nfe.max()
    for a, b in zip(fused[1].trace, ref[1].trace, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-3, atol=1e-6)


@requires_fused
@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_fused_handles_divergent_samples_like_pytorch(name):
    def f(z):  # sample 0 overflows to inf after a few steps, sample 2 turns NaN; the others contract
        out = 0.5 * z + 1.0
        out[0] = torch.exp(z[0] * 30.0)
        out[2] = torch.where(z[2] > 1.5, torch.nan, 0.9 * z[2] + 0.5)
        return out

    z0 = torch.full((5, 6), 0.5, dtype=torch.float64)
    kw = dict(max_iter=30, tol=1e-9, stop_mode="abs")
    fused, ref = _run(True, f, z0, name, **kw), _run(False, f, z0, name, **kw)
    assert fused[1].diverged[0] and fused[1].diverged[2]
    _assert_same(fused, ref, torch.float64)
    assert torch.isfinite(fused[0]).all()


@requires_fused
@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_switching_between_fused_and_pytorch_steps(name):
    """An f whose output is sometimes non-contiguous sends those evaluations down the PyTorch path; the two
    paths share every buffer, so the solve is the same as one taken entirely by either."""
    base = _problem(b=7, d=30, dtype=torch.float64, rho=0.95, seed=4)
    count = [0]

    def f(z):
        count[0] += 1
        out = base(z)
        return out.T.contiguous().T if count[0] % 3 == 0 else out  # non-contiguous every third call

    z0 = torch.zeros(7, 30, dtype=torch.float64)
    kw = dict(max_iter=20, tol=1e-7, stop_mode="rel")
    mixed = _run(True, f, z0, name, **kw)
    count[0] = 0
    ref = _run(False, f, z0, name, **kw)
    _assert_same(mixed, ref, torch.float64, factors=name == "broyden")  # tol 1e-7: above round-off


@requires_fused
def test_fused_broyden_factors_are_lazy_and_complete():
    f = _problem(b=4, d=16, dtype=torch.float64, rho=0.8, seed=5)
    _, st, _ = _run(True, f, torch.zeros(4, 16, dtype=torch.float64), "broyden", max_iter=6, tol=1e-30)
    _, sr, _ = _run(False, f, torch.zeros(4, 16, dtype=torch.float64), "broyden", max_iter=6, tol=1e-30)
    assert isinstance(st.broyden_factors, BroydenFactors)
    for a, b in zip(st.broyden_factors, sr.broyden_factors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@requires_fused
def test_fused_is_used_and_can_be_switched_off(monkeypatch):
    calls = []
    real = solvers._fused

    class Spy:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if not callable(attr):
                return attr

            def spy(*args):
                calls.append(name)
                return attr(*args)

            return spy

    monkeypatch.setattr(solvers, "_fused", Spy())
    f = _problem(b=3, d=8, dtype=torch.float32, rho=0.5, seed=6)
    z0 = torch.zeros(3, 8)
    _run(True, f, z0, "anderson", max_iter=6, tol=1e-30)
    assert calls.count("anderson") == 5 and calls.count("score") == 1  # the last evaluation only scores
    calls.clear()
    _run(False, f, z0, "anderson", max_iter=6, tol=1e-30)
    assert calls == []
    _run(True, f, z0, "broyden", max_iter=4, tol=1e-30)
    assert calls == ["broyden"] * 4
    calls.clear()
    _run(True, lambda z: 0.5 * z + 1, z0.half(), "fixed_point", max_iter=3, tol=1e-30)  # float16: PyTorch
    assert calls == []


def _broyden_factors(dtype: torch.dtype, b: int = 6, d: int = 24, max_iter: int = 9):
    f = _problem(b=b, d=d, dtype=dtype, rho=0.9, seed=7)
    _, st, _ = _run(True, f, torch.zeros(b, d, dtype=dtype), "broyden", max_iter=max_iter, tol=1e-30)
    return st.broyden_factors


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_iter", [2, 9])
def test_fused_transpose_apply_matches_pytorch_path(dtype, max_iter):
    factors = _broyden_factors(dtype, max_iter=max_iter)
    w = torch.randn(6, 24, dtype=dtype, generator=torch.Generator().manual_seed(8))
    fused = broyden_transpose_apply(factors, w)
    previous = set_fused(False)
    try:
        ref = broyden_transpose_apply(factors, w)
    finally:
        set_fused(previous)
    U, V = factors  # the dense form, -Bᵀ w = w - V Uᵀ w, formed only after both paths ran on (Q, K)
    dense = w - torch.einsum("bnd,bn->bd", V, torch.einsum("bnd,bd->bn", U, w))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(fused, dense, **tol)
    assert not torch.allclose(fused, w)  # the low-rank term is not negligible


@requires_fused
def test_fused_transpose_apply_is_used_only_where_it_applies(monkeypatch):
    calls = []
    real = solvers._fused.broyden_tapply

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(solvers._fused, "broyden_tapply", spy, raising=False)
    factors = _broyden_factors(torch.float64)
    w = torch.randn(6, 24, dtype=torch.float64)
    broyden_transpose_apply(factors, w)
    assert len(calls) == 1
    # A graph to record (w requires grad), another dtype, or a non-contiguous w: the PyTorch path, which
    # gives the same numbers and, with grad, the gradient.
    wg = w.clone().requires_grad_(True)
    out = broyden_transpose_apply(factors, wg)
    out.sum().backward()
    assert wg.grad is not None and len(calls) == 1
    torch.testing.assert_close(out.detach(), broyden_transpose_apply(factors, w))
    assert len(calls) == 2
    broyden_transpose_apply(factors, w.float())
    broyden_transpose_apply(factors, w.T.contiguous().T)
    assert len(calls) == 2
    with pytest.raises(RuntimeError):  # a batch that does not match the factors' is not read out of bounds
        broyden_transpose_apply(factors, torch.randn(7, 24, dtype=torch.float64))
    assert len(calls) == 2
