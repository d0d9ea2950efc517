"""Weight-tied models with per-layer sparse masks: overlap, the first layer, the convolutional model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fedeq.models import build_model
from fedeq.models.masks import MaskSpec, make_layer_masks, mask_overlap
from fedeq.models.tied import TiedMLP
from fedeq.models.tied_conv import TiedConv


@pytest.mark.parametrize(
    ("shape", "pattern", "density", "overlap"),
    [
        ((20, 20), "unstructured", 0.3, 0.0),
        ((20, 20), "unstructured", 0.3, 0.5),
        ((20, 20), "unstructured", 0.3, 1.0),
        ((8, 8, 3, 3), "unstructured", 0.5, 0.25),
        ((16, 4, 3, 3), "row", 0.25, 0.5),
    ],
)
def test_masks_have_the_requested_density_and_consecutive_overlap(shape, pattern, density, overlap):
    masks = make_layer_masks(shape, 5, MaskSpec(density, pattern, 3, overlap))
    n = shape[0] if pattern == "row" else masks[0].numel()
    k = round(density * n)
    for layer in range(5):
        if pattern == "row":
            rows = masks[layer].flatten(1)
            assert set(rows.mean(dim=1).tolist()) <= {0.0, 1.0} and int(rows[:, 0].sum()) == k
        else:
            assert int(masks[layer].sum()) == k
        if layer:
            got = mask_overlap(masks[layer - 1], masks[layer])
            assert got == pytest.approx(round(overlap * k) / k)
    if overlap < 1:
        assert not torch.equal(masks[0], masks[1])
    torch.testing.assert_close(masks, make_layer_masks(shape, 5, MaskSpec(density, pattern, 3, overlap)))


def test_impossible_overlap_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="mask_overlap 0.2 is too small for mask_density 0.7"):
        make_layer_masks((10, 10), 3, MaskSpec(0.7, "unstructured", 0, 0.2))
    with pytest.raises(ValueError, match=r"mask_overlap must be in \[0, 1\]"):
        MaskSpec(0.5, "unstructured", 0, 1.5).validate()
    for kwargs, key in [
        ({"mask_overlap": 1.5}, "mask_overlap"),
        ({"mask_density": 0.7, "mask_overlap": 0.0}, "mask_overlap"),
        ({"mask_pattern": "block"}, "mask_pattern"),
        ({"mask_density": 0}, "mask_density"),
        ({"depth": 0}, "depth"),
        ({"stride": "2"}, "stride"),
    ]:
        with pytest.raises(ValueError, match=rf"^model\.kwargs\.{key}"):
            build_model("tied_conv", (1, 8, 8), 10, SimpleNamespace(kwargs=kwargs))
    with pytest.raises(ValueError, match=r"^model\.kwargs\.mask_overlap"):
        build_model("tied_sparse", (1, 8, 8), 10, SimpleNamespace(kwargs={"mask_overlap": -0.1}))


@pytest.mark.parametrize("family", ["mlp", "conv"])
def test_the_first_layer_applies_its_mask(family):
    def make(seed):
        torch.manual_seed(0)
        if family == "mlp":
            return TiedMLP(12, 3, hidden=8, depth=1, mask_density=0.5, mask_seed=seed)
        return TiedConv(1, 3, channels=4, depth=1, mask_density=0.5, mask_seed=seed)

    a, b = make(1), make(2)
    x = torch.randn(3, 12) if family == "mlp" else torch.randn(3, 1, 6, 6)
    assert not torch.equal(a.masks[0], b.masks[0])
    with torch.no_grad():
        assert not torch.allclose(a(x).logits, b(x).logits)


def test_shared_mask_model_equals_the_tied_model_with_that_one_mask():
    torch.manual_seed(1)
    shared = TiedConv(2, 3, channels=4, depth=3, mask_density=0.5, mask_overlap=1.0, mask_seed=5)
    assert all(torch.equal(shared.masks[0], m) for m in shared.masks)
    dense = TiedConv(2, 3, channels=4, depth=3)
    state = shared.state_dict()
    state.update(kernel=shared.kernel.detach() * shared.masks[0], mask_density=torch.tensor(1.0))
    state["mask_overlap"] = torch.tensor(-1.0)
    dense.load_state_dict(state)
    assert dense.mask_spec[0] == 1.0
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, shared(x).logits)


@pytest.mark.parametrize("overlap", [None, 0.5, 1.0])
def test_gradients_reach_only_weights_that_some_layer_keeps(overlap):
    torch.manual_seed(2)
    model = TiedConv(1, 3, channels=4, depth=3, mask_density=0.25, mask_overlap=overlap)
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(model(x).logits, y).backward()
    kept = model.masks.ne(0).any(dim=0)
    grad = model.kernel.grad
    assert bool((grad[~kept] == 0).all())
    assert float(grad[kept].abs().gt(0).float().mean()) > 0.9
    if overlap == 1.0:
        assert int(kept.sum()) == round(0.25 * kept.numel())


def test_overlap_travels_and_the_masks_are_rebuilt_on_load():
    src = TiedConv(1, 3, channels=4, depth=3, mask_density=0.5, mask_overlap=0.25, mask_seed=4)
    dst = TiedConv(1, 3, channels=4, depth=3, mask_density=0.5)
    state = src.state_dict()
    assert "masks" not in state and float(state["mask_overlap"]) == 0.25
    dst.load_state_dict(state)
    assert dst.overlap == 0.25
    torch.testing.assert_close(dst.masks, src.masks)
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        out = dst(x, f_max_iter=2)
    assert out.deq.forward.nfe.tolist() == [2, 2]
    mnist_like = build_model("tied_conv", (1, 28, 28), 10, SimpleNamespace(kwargs={"mask_density": 0.5}))
    assert mnist_like.stem.stride == (2, 2) and mnist_like(torch.randn(2, 1, 28, 28)).logits.shape == (2, 10)


def test_mask_study_runs_every_column_with_the_requested_masks(tmp_path, capsys):
    """``simulations/tied_masks.py``: dense, shared, independent and fixed-overlap columns; one row a run."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "simulations" / "tied_masks.py"
    spec = importlib.util.spec_from_file_location("tied_masks_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    args = ["--data", "digits", "--depths", "2", "--densities", "0.5", "--overlaps", "0", "0.5"]
    study.main([*args, "--channels", "4", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path)])
    df = pd.read_csv(tmp_path / "tied_masks.csv")
    assert sorted(df.masks.unique()) == ["dense", "distinct", "overlap 0", "overlap 0.5", "shared"]
    assert len(df) == 5 * 2 and df.test_acc.between(0, 1).all() and df.train_acc.between(0, 1).all()
    assert set(df[df.masks == "dense"].density) == {1.0} and set(df[df.masks != "dense"].density) == {0.5}
    out = capsys.readouterr().out
    header = "| dense | shared mask | distinct masks | distinct, overlap 0 | distinct, overlap 0.5 |"
    assert out.count(header) == 2 and "test accuracy" in out and "training-set accuracy" in out
    assert out.rstrip().splitlines()[-1].startswith("| 2 | 0.5 |")


def test_tied_conv_refuses_the_tied_sparse_mask_keys() -> None:
    """``model.mask_density`` configures ``tied_sparse``; ``tied_conv`` takes its masks from ``model.kwargs``
    and refuses the other keys instead of training a dense model."""
    from fedeq.config import load_config

    cfg = load_config(None, ["model.name=tied_conv", "model.mask_density=0.25"]).model
    with pytest.raises(ValueError, match=r"model.mask_density=0.25 is not read by tied_conv.*model.kwargs"):
        build_model("tied_conv", (1, 8, 8), 10, cfg)
    ok = load_config(None, ["model.name=tied_conv", "model.kwargs.mask_density=0.25"]).model
    assert build_model("tied_conv", (1, 8, 8), 10, ok) is not None
