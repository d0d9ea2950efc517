"""Models: shapes, budgets per call, parameter counts, central training accuracy on digits."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedeq.models import MLPDEQ, ConvDEQ, ModelOutput, build_model, num_parameters, register_model
from fedeq.registry import MODELS
from fedeq.train import accuracy_vs_budget, evaluate, train_local


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_conv_deq_shapes_and_budget(shape):
    torch.manual_seed(0)
    model = ConvDEQ(shape[0], 10, channels=8, f_max_iter=5)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        out = model(x, f_max_iter=3)
    assert out.logits.shape == (4, 10)
    assert (out.deq.forward.nfe <= 3).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_builds_trainable_models(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10, None, f_max_iter=4, b_max_iter=4)
    assert num_parameters(model) > 0
    x = torch.randn(6, 1, 8, 8)
    out = model(x)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model.name must be one of mlp_deq, conv_deq, explicit"):
        build_model("resnet", (1, 8, 8), 10)


def test_registered_model_family_is_built_by_name():
    """A factory registered with ``register_model`` is built by ``build_model`` with the config passed
    (DEQ settings go to the model's DEQ layers, not to the factory)."""
    seen = {}

    class Linear(torch.nn.Module):
        def __init__(self, in_features: int, num_classes: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(in_features, num_classes)

        def forward(self, x: torch.Tensor, **_: object) -> ModelOutput:
            return ModelOutput(self.fc(x.flatten(1)))

    @register_model("test_linear")
    def build_linear(input_shape, num_classes, cfg):
        seen.update(shape=input_shape, cfg=cfg)
        return Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)

    cfg = object()
    try:
        assert "test_linear" in MODELS and MODELS.get("test_linear") is build_linear
        model = build_model("test_linear", [1, 8, 8], 3, cfg, f_max_iter=7)
        assert isinstance(model, Linear) and num_parameters(model) == 64 * 3 + 3
        assert seen == {"shape": (1, 8, 8), "cfg": cfg}
        assert model(torch.randn(2, 1, 8, 8)).logits.shape == (2, 3)
        with pytest.raises(ValueError, match=r"model.name must be one of mlp_deq, .*lyadeq, test_linear"):
            build_model("resnet", (1, 8, 8), 10)
    finally:
        MODELS.unregister("test_linear")
    with pytest.raises(ValueError, match="model.name must be one of"):
        build_model("test_linear", (1, 8, 8), 3)


def test_unknown_model_name_lists_every_built_in_family():
    with pytest.raises(ValueError) as err:
        build_model("resnet", (1, 8, 8), 10)
    assert str(err.value) == (
        "model.name must be one of mlp_deq, conv_deq, explicit, mondeq, conv_mondeq, tied, tied_sparse, "
        "tied_conv, potential_deq, lyadeq (got 'resnet')"
    )


def test_mlp_deq_weight_is_a_contraction():
    torch.manual_seed(0)
    model = MLPDEQ(64, 10, hidden=32, contraction=0.8)
    w = model.scale(model.weight)
    assert float(torch.linalg.matrix_norm(w.detach(), 2)) == pytest.approx(0.8, rel=1e-3)


def test_weight_tied_deq_is_smaller_than_explicit_baseline():
    deq = build_model("mlp_deq", (1, 8, 8), 10)
    explicit = build_model("explicit", (1, 8, 8), 10)
    assert num_parameters(deq) < num_parameters(explicit)


def test_central_training_on_digits_reaches_95_percent_and_reports_budget_curve():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    torch.manual_seed(0)
    model = build_model("mlp_deq", (1, 8, 8), 10, None, solver="anderson", f_max_iter=12, b_max_iter=12)
    for epoch in range(8):
        stats = train_local(model, xtr, ytr, epochs=1, lr=0.01, batch_size=32, seed=epoch)
    assert stats.nfe_fwd > 1 and stats.nfe_bwd > 0 and 0 <= stats.fp_residual < 1
    acc = evaluate(model, xte, yte).accuracy
    assert acc >= 0.95
    curve = accuracy_vs_budget(model, xte, yte, budgets=(1, 2, 4, 8, 16, 32))
    assert [r["budget"] for r in curve] == [1, 2, 4, 8, 16, 32]
    assert all(r["nfe_fwd"] <= r["budget"] for r in curve)
    # Residual falls with the budget; accuracy at large budgets does not collapse.
    assert curve[-1]["fp_residual"] < curve[0]["fp_residual"]
    assert curve[-1]["accuracy"] >= 0.95


def test_training_is_deterministic_for_a_seed():
    x, y = load_digits(return_X_y=True)
    x = (x[:300] / 16.0).astype(np.float32)
    y = y[:300]

    def run():
        torch.manual_seed(3)
        m = build_model("mlp_deq", (1, 8, 8), 10, None, f_max_iter=6, b_max_iter=6)
        train_local(m, x, y, epochs=1, seed=11, jac_reg=0.1, randomize_budget=True)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(run(), run())


def test_fedprox_term_pulls_towards_start():
    x, y = load_digits(return_X_y=True)
    x = (x[:200] / 16.0).astype(np.float32)
    y = y[:200]
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        m = build_model("mlp_deq", (1, 8, 8), 10, None, f_max_iter=4, b_max_iter=4)
        start = torch.cat([p.detach().flatten() for p in m.parameters()])
        train_local(m, x, y, epochs=2, seed=0, proximal_mu=mu, lr=0.05)
        drift[mu] = float((torch.cat([p.detach().flatten() for p in m.parameters()]) - start).norm())
    assert drift[10.0] < drift[0.0]


def test_move_to_skips_a_model_already_on_the_device(monkeypatch):
    from fedeq.train import move_to

    calls = []
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.GroupNorm(1, 2))
    monkeypatch.setattr(model, "to", lambda device: calls.append(device) or model)
    assert move_to(model, "cpu") is model and calls == []
    meta = torch.nn.Sequential(torch.nn.Linear(3, 2)).to("meta")
    monkeypatch.setattr(meta, "to", lambda device: calls.append(device) or meta)
    move_to(meta, "cpu")
    assert calls == [torch.device("cpu")]
