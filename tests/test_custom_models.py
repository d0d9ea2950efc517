"""Your own model: the factory protocol, ``DEQClassifier``, ``model.kwargs`` and plugin models in real runs.

The end-to-end runs write their model to a temporary folder outside the repository and go through
``python -m fedeq.cli.main simulate`` in a fresh process, so every process of the run (driver, Ray actors,
Flower's simulation processes) must import the plugin itself.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedeq.config import ConfigError, load_config
from fedeq.deq import DEQ
from fedeq.models import (
    MLPDEQ,
    DEQClassifier,
    build_model,
    model_kwargs,
    register_model,
    set_deq_settings,
)
from fedeq.models.parts import deq_parts
from fedeq.registry import MODELS
from tests.doc_blocks import fenced_blocks, write_doc_files

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
DOC = ROOT / "docs" / "custom_models.md"

PLUGIN = """
import torch
from torch import nn

from fedeq.models import DEQClassifier, register_model


class PluginDEQ(DEQClassifier):
    def __init__(self, input_shape, num_classes, width):
        super().__init__(input_shape, num_classes, width)
        self.plugin_lin = nn.Linear(width, width, bias=False)
        self.plugin_norm = nn.LayerNorm(width)
        nn.init.normal_(self.plugin_lin.weight, std=0.3 / width**0.5)

    def cell(self, z, c):
        return torch.tanh(self.plugin_norm(self.plugin_lin(z) + c))


@register_model("plugin_deq")
def build_plugin_deq(input_shape, num_classes, cfg, width: int = 16):
    return PluginDEQ(input_shape, num_classes, width)
"""
PLUGIN_KEYS = {
    "inject.weight",
    "inject.bias",
    "head.weight",
    "head.bias",
    "plugin_lin.weight",
    "plugin_norm.weight",
    "plugin_norm.bias",
}

PACKAGE_MODULE = """
import math

import torch
from torch import nn

from fedeq.deq import DEQ
from fedeq.models import ModelOutput


class Cell(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.pkg_lin = nn.Linear(width, width)

    def forward(self, z, c):
        return torch.tanh(0.5 * self.pkg_lin(z) + c)


class PackagedDEQ(nn.Module):
    def __init__(self, in_features, num_classes, width):
        super().__init__()
        self.pkg_inject = nn.Linear(in_features, width)
        self.deq = DEQ(Cell(width))
        self.pkg_head = nn.Linear(width, num_classes)

    def forward(self, x, **deq_overrides):
        c = self.pkg_inject(x.flatten(1))
        out = self.deq(c, torch.zeros_like(c), **deq_overrides)
        return ModelOutput(self.pkg_head(out.z), out)


def make(input_shape, num_classes, cfg, width: int = 16):
    return PackagedDEQ(math.prod(input_shape), num_classes, width)


not_a_factory = 3
"""


def _outside_repo(path: Path) -> Path:
    assert not path.resolve().is_relative_to(ROOT), path
    return path


def _write_plugin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = _outside_repo(folder / "my_plugin_models.py")
    path.write_text(PLUGIN, encoding="utf-8")
    return path


def _write_package(root: Path) -> Path:
    pkg = root / "fedeq_test_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "cells.py").write_text(PACKAGE_MODULE, encoding="utf-8")
    return _outside_repo(root)


def _cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedeq.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _one_line_exit_2(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# DEQClassifier and the protocol, in process
# ---------------------------------------------------------------------------------------------


class _TinyDEQ(DEQClassifier):
    def __init__(self, input_shape, num_classes, width=8, **deq_settings):
        super().__init__(input_shape, num_classes, width, **deq_settings)
        self.lin = torch.nn.Linear(width, width)

    def cell(self, z, c):
        return torch.tanh(0.5 * self.lin(z) + c)


def test_mlp_deq_on_the_base_class_keeps_its_numerics():
    """Logits and gradients equal, bit for bit, the hand-wired DEQ of the same weights (solver, backward)."""

    def reference(m: MLPDEQ, x: torch.Tensor, **overrides):
        def tanh_cell(z, ctx):
            u, w = ctx
            return torch.tanh(torch.addmm(u, z, w.T))

        u = m.inject(x.flatten(1))
        w = m.scale(m.weight)
        layer = DEQ(tanh_cell)
        layer.settings = m.deq.settings
        return m.head(layer((u, w), torch.zeros_like(u), **overrides).z)

    torch.manual_seed(0)
    model = MLPDEQ(64, 10, hidden=16)
    assert [n for n, _ in model.named_parameters()] == [
        "weight",
        "inject.weight",
        "inject.bias",
        "head.weight",
        "head.bias",
    ]
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    for overrides in (
        {},
        {"solver": "fixed_point", "f_max_iter": 3, "backward": "jfb"},
        {"solver": "anderson", "f_max_iter": 7, "b_max_iter": 4, "backward": "phantom"},
        {"solver": "broyden", "f_max_iter": 9, "b_max_iter": 5, "backward": "broyden_reuse"},
    ):
        twin = copy.deepcopy(model)
        model.zero_grad()
        logits = model(x, **overrides).logits
        F.cross_entropy(logits, y).backward()
        ref = reference(twin, x, **overrides)
        F.cross_entropy(ref, y).backward()
        assert torch.equal(logits, ref)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_deq_classifier_wires_settings_overrides_and_parts():
    MODELS.register("test_tiny_deq", lambda shape, classes, cfg, width=8: _TinyDEQ(shape, classes, width))
    try:
        torch.manual_seed(0)
        model = build_model("test_tiny_deq", (1, 8, 8), 5, None, solver="broyden", f_max_iter=11)
    finally:
        MODELS.unregister("test_tiny_deq")
    assert model.deq.settings.solver == "broyden" and model.deq.settings.f_max_iter == 11
    assert {n for n, _ in model.named_parameters()} == {
        "inject.weight",
        "inject.bias",
        "head.weight",
        "head.bias",
        "lin.weight",
        "lin.bias",
    }
    x = torch.randn(4, 1, 8, 8)
    for backward in ("ift", "phantom", "jfb"):
        model.zero_grad()
        out = model(x, solver="anderson", f_max_iter=3, b_max_iter=2, backward=backward)
        assert out.logits.shape == (4, 5) and int(out.deq.forward.nfe.max()) <= 3
        assert out.deq.settings.solver == "anderson" and model.deq.settings.solver == "broyden"
        out.logits.sum().backward()
        assert model.lin.weight.grad is not None and model.inject.weight.grad.abs().sum() > 0
    parts = deq_parts(model)
    z = torch.randn(4, 8)
    assert torch.equal(parts.f(z, x), model.cell(z, model.injection(x)))
    assert torch.equal(parts.readout(z), model.head(z)) and parts.settings is model.deq.settings


def test_deq_classifier_without_cell_or_defaults_says_what_is_missing():
    class NoCell(DEQClassifier):
        pass

    with pytest.raises(NotImplementedError, match="NoCell must define cell"):
        NoCell((1, 2), 3, width=4)(torch.randn(2, 1, 2))

    class NoDefaults(DEQClassifier):
        def cell(self, z, c):
            return z

    with pytest.raises(NotImplementedError, match="pass width= or override injection"):
        NoDefaults()(torch.randn(2, 3))


def test_set_deq_settings_reaches_every_settings_holder():
    torch.manual_seed(0)
    tied = build_model("tied", (1, 8, 8), 10, None)
    assert tied.settings.f_max_iter == 3  # the family's own default (its depth)
    assert set_deq_settings(tied, f_max_iter=5, backward="jfb") == 1
    assert (tied.settings.f_max_iter, tied.settings.backward) == (5, "jfb")
    explicit = build_model("explicit", (1, 8, 8), 10, None, f_max_iter=4)  # no DEQ layer: nothing to set
    assert set_deq_settings(explicit, f_max_iter=4) == 0
    with pytest.raises(ValueError, match="unknown DEQ option"):
        build_model("explicit", (1, 8, 8), 10, None, f_max_itr=4)
    with pytest.raises(ValueError, match="f_max_iter"):
        build_model("mlp_deq", (1, 8, 8), 10, None, f_max_iter=0)


def test_model_kwargs_reach_the_factory_and_are_checked():
    cfg = load_config(None, ["model.kwargs.contraction=0.5", "model.hidden=8"])
    assert cfg.model.kwargs == {"contraction": 0.5}
    assert build_model(cfg.model.name, (1, 8, 8), 10, cfg.model).scale.gamma == 0.5
    view = SimpleNamespace(hidden=8, kwargs=SimpleNamespace(contraction=None))  # an attribute view
    assert (
        model_kwargs(view) == {"contraction": None}
        and build_model("mlp_deq", (1, 8, 8), 10, view).scale is None
    )
    with pytest.raises(
        ValueError,
        match=r"model\.kwargs\.gamma: not an option of model factory build_mlp_deq; "
        r"allowed: contraction",
    ):
        build_model("mlp_deq", (1, 8, 8), 10, SimpleNamespace(kwargs={"gamma": 0.5}))
    with pytest.raises(ConfigError, match=r"^model\.kwargs\.hidden: .*allowed: none \(the factory takes no"):
        load_config(None, ["model.name=explicit", "model.kwargs.hidden=8"])


def test_factory_signatures_are_checked_before_any_work():
    def needs_width(input_shape, num_classes, cfg, *, width):
        return _TinyDEQ(input_shape, num_classes, width)

    def takes_anything(input_shape, num_classes, cfg, **kwargs):
        return _TinyDEQ(input_shape, num_classes, **kwargs)

    def two_arguments(input_shape, num_classes):
        return _TinyDEQ(input_shape, num_classes)

    for name, factory in [("t_needs", needs_width), ("t_any", takes_anything), ("t_two", two_arguments)]:
        register_model(name)(factory)
    try:
        err = pytest.raises(ConfigError, load_config, None, ["model.name=t_needs"]).value
        assert err.key == "model.kwargs.width" and "required by model factory" in str(err)
        assert "allowed: width" in str(err)
        cfg = load_config(None, ["model.name=t_needs", "model.kwargs.width=6"])
        assert build_model(cfg.model.name, (1, 8, 8), 3, cfg.model).lin.in_features == 6
        cfg = load_config(None, ["model.name=t_any", "model.kwargs.width=5", "model.kwargs.tol=1e-6"])
        assert cfg.model.kwargs == {"width": 5, "tol": 1e-6}  # open: any name, the factory decides
        err = pytest.raises(ConfigError, load_config, None, ["model.name=t_two"]).value
        assert err.key == "model.name" and "does not follow the factory protocol" in str(err)
        assert "factory(input_shape, num_classes, cfg, **kwargs)" in str(err)
    finally:
        for name in ("t_needs", "t_any", "t_two"):
            MODELS.unregister(name)


def test_package_module_factory_is_named_by_import_path(tmp_path, monkeypatch):
    err = pytest.raises(ConfigError, load_config, None, ["model.name=fedeq_test_pkg.cells:make"]).value
    assert err.key == "model.name" and "cannot load the model factory" in str(err)
    assert "mlp_deq" in err.allowed and "package.module:factory" in err.allowed
    monkeypatch.syspath_prepend(str(_write_package(tmp_path)))
    cfg = load_config(None, ["model.name=fedeq_test_pkg.cells:make", "model.kwargs.width=12"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, (1, 8, 8), 10, cfg.model, f_max_iter=6)
    assert type(model).__name__ == "PackagedDEQ"
    assert model.pkg_inject.out_features == 12 and model.deq.settings.f_max_iter == 6
    assert int(model(torch.randn(2, 1, 8, 8), f_max_iter=2).deq.forward.nfe.max()) <= 2
    for bad, what in [
        ("fedeq_test_pkg.cells:missing", "has no attribute"),
        ("fedeq_test_pkg.cells:not_a_factory", "is not callable"),
    ]:
        err = pytest.raises(ConfigError, load_config, None, [f"model.name={bad}"]).value
        assert err.key == "model.name" and what in str(err)
    err = pytest.raises(
        ConfigError, load_config, None, ["model.name=fedeq_test_pkg.cells:make", "model.kwargs.widht=3"]
    ).value
    assert err.key == "model.kwargs.widht" and err.allowed == "width"


def test_the_client_model_cache_takes_model_kwargs():
    from clients.run_setup import model_for

    cfg = load_config(None, ["model.hidden=8", "model.kwargs.contraction=0.3"])
    model = model_for(cfg)
    assert isinstance(model, MLPDEQ) and model.scale.gamma == 0.3 and model.hidden == 8
    assert model_for(cfg) is model


# ---------------------------------------------------------------------------------------------
# The CLI: unknown kwargs exit 2 before any work
# ---------------------------------------------------------------------------------------------


def test_unknown_factory_kwargs_exit_2_naming_the_key(tmp_path):
    plugin = _write_plugin(tmp_path / "plugins")
    out = tmp_path / "out"
    res = _cli(
        "simulate",
        str(QUICK),
        f"plugins=[{plugin}]",
        "model.name=plugin_deq",
        "model.kwargs.widht=16",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    line = _one_line_exit_2(res)
    assert line == (
        "fedeq: error: model.kwargs.widht: not an option of model factory build_plugin_deq; "
        "allowed: width (got 16)"
    )
    assert not out.exists()


def test_a_factory_refusing_its_option_values_exits_2_before_any_work(tmp_path):
    out = tmp_path / "out"
    res = _cli("simulate", str(QUICK), "model.kwargs.contraction=2", f"output_dir={out}", cwd=tmp_path)
    line = _one_line_exit_2(res)
    assert line.startswith("fedeq: error: model.kwargs: the model factory refused its options (ValueError: ")
    assert "contraction must be in (0, 1)" in line and line.endswith("(got {'contraction': 2})")
    assert not out.exists()


def _doc_blocks() -> list[tuple[str, str]]:
    return fenced_blocks(DOC)


def _write_doc_files(folder: Path) -> list[str]:
    return write_doc_files(DOC, folder)


def test_the_documented_error_line_is_what_the_cli_prints(tmp_path):
    _write_doc_files(_outside_repo(tmp_path))
    shown = next(b for lang, b in _doc_blocks() if lang == "text" and "fedeq: error:" in b)
    command, printed = (ln.strip() for ln in shown.strip().splitlines())
    args = command.removeprefix("$ fedeq ").split()
    res = _cli(*[a.strip("'") for a in args], f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert _one_line_exit_2(res) == printed
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# End to end: the docs' code, and plugin models on every engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_docs_code_runs_including_a_federated_run(tmp_path, monkeypatch):
    code = _write_doc_files(_outside_repo(tmp_path))
    assert len(code) >= 4 and (tmp_path / "my_deq.py").is_file() and (tmp_path / "plain_deq.py").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace: dict[str, object] = {"__name__": "custom_models_doc"}
    try:
        for block in code:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        MODELS.unregister("norm_tanh_deq")
    out = Path(namespace["out"])
    assert out.resolve() == (tmp_path / "runs" / "my_deq").resolve()
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "norm_tanh_deq" and summary["clients_failed"] == 0
    assert summary["final_test_acc"] > summary["initial_test_acc"] + 0.2


def _check_plugin_run(
    out: Path, rounds: int, expected_keys: set[str], model: str, tiers: dict[str, int]
) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == model
    state = torch.load(out / "global_model.pt")
    assert set(state) == expected_keys
    assert summary["num_parameters"] == sum(v.numel() for v in state.values())
    clients = pd.read_csv(out / "clients.csv")
    # every client trained the plugin's model: a reply with other arrays would be rejected by the guard
    assert len(clients) == 4 * rounds and (clients["status"] == "ok").all(), clients[["tier", "status"]]
    assert set(clients["tier"]) == set(tiers)
    for _, row in clients.iterrows():  # and its tier's solver budget reached the plugin's cell
        assert 0 < row["nfe_fwd"] <= tiers[row["tier"]] + 1
    table = pd.read_csv(out / "rounds.csv")
    assert table["round"].tolist() == list(range(1, rounds + 1))
    assert (table["clients_failed"] == 0).all() and (table["clients_rejected"] == 0).all()
    assert table["test_acc"].iloc[-1] > summary["initial_test_acc"] + 0.2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "flower"])
def test_plugin_model_from_outside_the_repository_trains_on_every_client(tmp_path, engine):
    plugin = _write_plugin(tmp_path / "elsewhere")
    res = _cli(
        "simulate",
        str(QUICK),
        f"plugins=[{plugin}]",
        "model.name=plugin_deq",
        "model.kwargs.width=12",
        f"engine={engine}",
        "rounds=2",
        f"output_dir={tmp_path / 'out'}",
        "run_name=run",
        "--quiet",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out" / "run"
    assert json.loads((out / "summary.json").read_text())["engine"] == engine
    _check_plugin_run(out, 2, PLUGIN_KEYS, "plugin_deq", {"small": 2, "large": 8})


@pytest.mark.slow
def test_package_module_factory_on_pythonpath_trains(tmp_path):
    root = _write_package(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = _cli(
        "simulate",
        str(QUICK),
        "model.name=fedeq_test_pkg.cells:make",
        "model.kwargs.width=24",
        "rounds=2",
        f"output_dir={tmp_path / 'out'}",
        "run_name=run",
        "--quiet",
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    keys = {
        "pkg_inject.weight",
        "pkg_inject.bias",
        "deq.func.pkg_lin.weight",
        "deq.func.pkg_lin.bias",
        "pkg_head.weight",
        "pkg_head.bias",
    }
    _check_plugin_run(
        tmp_path / "out" / "run", 2, keys, "fedeq_test_pkg.cells:make", {"small": 2, "large": 8}
    )


def test_docs_blocks_are_found():
    """The doc keeps its runnable shape: a plugin file, a file for the import-path form, code, an error."""
    blocks = _doc_blocks()
    files = [b.partition("\n")[0] for lang, b in blocks if lang == "python" and b.startswith("# file: ")]
    assert files == ["# file: my_deq.py", "# file: plain_deq.py"]
    first = next(b for lang, b in blocks if lang == "python")
    assert len(textwrap.dedent(first).strip().splitlines()) <= 30
