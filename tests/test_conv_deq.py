"""conv_deq: shapes (MNIST- and CIFAR-shaped), every solver x backward mode, per-call budgets, config keys,
learning on generated data, and (slow) central accuracy on mnist5k."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fedeq.deq  # noqa: F401  (registers the solvers and backward modes)
from fedeq.config import ConfigError, load_config
from fedeq.models import ConvDEQ, build_model, num_parameters
from fedeq.models.parts import deq_parts
from fedeq.registry import BACKWARDS, SOLVERS

SHAPES = [(1, 28, 28), (3, 32, 32)]


def _model(in_channels: int = 3, **kwargs) -> ConvDEQ:
    torch.manual_seed(0)
    return ConvDEQ(in_channels, 10, **{"channels": 8, **kwargs})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "sizes",
    [{}, {"downsample": 0, "readout_grid": 2}, {"downsample": 2, "blocks": 2, "expansion": 2}],
)
def test_shapes_of_state_and_logits(shape, sizes):
    model = _model(shape[0], **sizes)
    x = torch.randn(5, *shape)
    ds = sizes.get("downsample", 1)
    with torch.no_grad():
        out = model(x, f_max_iter=4)
    assert out.logits.shape == (5, 10)
    assert out.deq.z.shape == (5, 8, shape[1] // 2**ds, shape[2] // 2**ds)
    assert len(model.blocks) == sizes.get("blocks", 1)
    assert model.blocks[0].conv1.out_channels == 8 * sizes.get("expansion", 1)


def test_readout_keeps_spatial_information():
    """A readout that pooled globally could not tell an image from its left-right mirror image."""
    model = _model(1).eval()
    z = torch.randn(2, 8, 14, 14)
    with torch.no_grad():
        a, b = model.readout(z), model.readout(z.flip(-1))
    assert not torch.allclose(a, b, atol=1e-4)


def _combinations():
    for solver, backward in itertools.product(SOLVERS.names(), BACKWARDS.names()):
        if BACKWARDS.get(backward).requires_solver in (None, solver):
            yield solver, backward


@pytest.mark.parametrize(("solver", "backward"), list(_combinations()))
def test_every_solver_and_backward_mode_trains_on_cifar_shapes(solver, backward):
    model = _model(3)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = model(x, solver=solver, backward=backward, f_max_iter=5, b_max_iter=3, tol=1e-9)
    assert out.logits.shape == (6, 10)
    assert int(out.deq.forward.nfe.max()) <= 5
    F.cross_entropy(out.logits, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.blocks.parameters())
    assert out.deq.backward.ready or backward == "jfb"
    assert out.deq.backward.nfe <= 3


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_per_call_budgets_are_respected(solver):
    model = _model(1, f_max_iter=30).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        for k in (1, 2, 7):
            st = model(x, solver=solver, f_max_iter=k, tol=1e-12).deq.forward
            assert int(st.nfe.max()) <= k and int(st.nfe.min()) >= 1
    assert model.deq.settings.f_max_iter == 30  # a call's override does not change the default


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_point_is_reached_at_initialisation(shape):
    """The residual falls with the budget and a full solve reaches a small relative residual."""
    model = _model(shape[0], channels=16).eval()
    x = torch.rand(8, *shape)
    with torch.no_grad():
        res = [
            float(model(x, solver="anderson", f_max_iter=k, tol=1e-12).deq.forward.rel_residual.mean())
            for k in (2, 8, 30)
        ]
    assert res[0] > res[1] > res[2] and res[2] < 1e-3


def test_parts_reproduce_the_forward_pass():
    model = _model(1).eval()
    x = torch.rand(3, 1, 28, 28)
    parts = deq_parts(model)
    with torch.no_grad():
        out = model(x, f_max_iter=30, tol=1e-10)
        assert torch.allclose(parts.readout(out.deq.z), out.logits, atol=1e-5)
        step = parts.f(out.deq.z, x)
    assert float((step - out.deq.z).norm() / step.norm()) < 1e-3


def test_a_few_steps_reduce_the_loss_on_generated_cifar_shaped_data():
    """Labels are the quadrant holding a bright square: learnable only with spatial information."""
    g = torch.Generator().manual_seed(0)
    n = 64
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, :, 16 * r + 4 : 16 * r + 12, 16 * c + 4 : 16 * c + 12] += 1.0
    model = ConvDEQ(3, 4, channels=8, f_max_iter=6, b_max_iter=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_factory_reads_the_model_section():
    cfg = load_config(
        None,
        [
            "model.name=conv_deq",
            "model.channels=8",
            "model.blocks=2",
            "model.expansion=2",
            "model.downsample=2",
            "model.readout_grid=3",
        ],
    ).model
    model = build_model("conv_deq", (3, 32, 32), 10, cfg, f_max_iter=3)
    assert isinstance(model, ConvDEQ) and len(model.blocks) == 2
    assert model.deq.settings.f_max_iter == 3
    assert model.head[-1].in_features == 16 * 3 * 3
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).deq.z.shape == (2, 8, 8, 8)
    small = build_model("conv_deq", (3, 32, 32), 10, load_config(None, ["model.channels=8"]).model)
    assert num_parameters(small) < num_parameters(model)


@pytest.mark.parametrize(
    "override", ["model.downsample=-1", "model.blocks=0", "model.expansion=0", "model.readout_grid=0"]
)
def test_invalid_sizes_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_config(None, ["model.name=conv_deq", override])
    with pytest.raises(ValueError, match=key.split(".")[1]):
        ConvDEQ(1, 10, **{key.split(".")[1]: -1})


@pytest.mark.slow
def test_central_training_on_mnist5k_reaches_95_percent():
    from fedeq.data import load_dataset
    from fedeq.train import evaluate, train_local

    splits = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = ConvDEQ(1, 10, channels=24, downsample=1)
    deq = {"solver": "anderson", "f_max_iter": 8, "b_max_iter": 6, "backward": "ift"}
    for epoch, lr in enumerate([2e-3, 5e-4]):
        train_local(
            model, splits.x_train, splits.y_train, epochs=1, lr=lr, batch_size=32, deq=deq, seed=epoch
        )
    acc = evaluate(model, splits.x_test, splits.y_test, **deq).accuracy
    assert acc >= 0.95, acc
