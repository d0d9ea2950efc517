"""fedeq.train.optim against torch.optim: the same updates bit for bit, clear errors, no torch._dynamo import."""

import copy
import subprocess
import sys

import pytest
import torch

from fedeq.models.core import build_model
from fedeq.train.local import train_local
from fedeq.train.optim import SGD, Adam, make_optimizer


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))


def _pair(kind: str, weight_decay: float, a: torch.nn.Module, b: torch.nn.Module):
    if kind == "adam":
        return (
            Adam(a.parameters(), lr=0.01, weight_decay=weight_decay),
            torch.optim.Adam(b.parameters(), lr=0.01, weight_decay=weight_decay),
        )
    return (
        SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay),
        torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_updates_equal_torch_optim_bit_for_bit(kind, weight_decay, dtype):
    a = _net().to(dtype)
    b = copy.deepcopy(a)
    ours, ref = _pair(kind, weight_decay, a, b)
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        x = torch.randn(8, 6, generator=gen, dtype=dtype)
        full = step % 2 == 1
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=not full)
            hidden = model[1](model[0](x))
            # on even steps the last layer's bias gets no gradient: it is skipped and its state kept
            out = model[2](hidden) if full else hidden @ model[2].weight.T
            out.pow(2).mean().backward()
            opt.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), f"{kind} differs from torch.optim at step {step}"
    assert not torch.equal(a[0].weight, _net()[0].weight.to(dtype))  # it did train


def test_train_local_matches_torch_optim_adam(monkeypatch):
    """A whole local training run (DEQ, FedProx term) gives the parameters torch.optim.Adam gives."""
    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(48) % 10
    model = build_model("mlp_deq", (64,), 10, f_max_iter=6, b_max_iter=4)
    ref_model = copy.deepcopy(model)
    kw = dict(epochs=2, lr=0.01, batch_size=16, proximal_mu=0.1, weight_decay=1e-3, seed=3)
    train_local(model, x, y, **kw)
    monkeypatch.setattr(
        "fedeq.train.local.make_optimizer",
        lambda name, params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    )
    train_local(ref_model, x, y, **kw)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_zero_grad_keeps_or_drops_gradients():
    net = _net()
    opt = Adam(net.parameters())
    net(torch.randn(2, 6)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda p: Adam(p, lr=0.0), "lr must be > 0"),
        (lambda p: Adam(p, betas=(0.9, 1.0)), r"betas must lie in \[0, 1\)"),
        (lambda p: SGD(p, lr=0.1, momentum=-0.1), r"momentum must lie in \[0, 1\)"),
        (lambda p: SGD(p, lr=0.1, weight_decay=-1.0), "weight_decay must be >= 0"),
        (lambda p: Adam([]), "params must hold at least one tensor"),
        (lambda p: make_optimizer("rmsprop", p, lr=0.1), "train.optimizer must be one of adam, sgd"),
    ],
)
def test_bad_arguments_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build(list(_net().parameters()))


def test_local_training_does_not_import_torch_dynamo():
    """torch.optim imports torch._dynamo (~40 MB) in every process that trains; fedeq's optimizers do not."""
    code = (
        "import sys, torch\n"
        "from fedeq.models.core import build_model\n"
        "from fedeq.train.local import train_local\n"
        "m = build_model('mlp_deq', (64,), 10)\n"
        "for opt in ('adam', 'sgd'):\n"
        "    train_local(m, torch.randn(32, 64), torch.arange(32) % 10, epochs=1, optimizer=opt)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    run = dict(capture_output=True, text=True, timeout=120, check=True)
    out = subprocess.run([sys.executable, "-c", code], **run)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
