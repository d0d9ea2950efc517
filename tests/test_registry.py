"""fedeq.registry: the generic registry, plugin imports, object paths; the lazy public API of fedeq."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import fedeq
from fedeq.registry import (
    BACKWARDS,
    DATASETS,
    ENGINES,
    MODELS,
    PARTITIONERS,
    PERSONALIZATION,
    QUALITY,
    SOLVERS,
    PluginError,
    Registry,
    import_plugins,
    load_object,
)


def test_register_get_names_in_order() -> None:
    reg: Registry[int] = Registry("widget")

    @reg.register("first")
    def first() -> int:
        return 1

    reg.register("second", 2)
    assert reg.names() == ("first", "second")
    assert reg.get("first") is first
    assert reg.get("second") == 2
    assert "second" in reg and "third" not in reg
    assert list(reg) == ["first", "second"]


def test_unknown_name_lists_the_allowed_ones() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; allowed: a \| b"):
        reg.get("c")


def test_taken_name_is_refused_unless_same_object() -> None:
    reg: Registry[object] = Registry("widget")
    marker = object()
    reg.register("a", marker)
    reg.register("a", marker)  # importing a module twice is harmless
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", object())
    with pytest.raises(ValueError, match="must be an identifier"):
        reg.register("not a name", 1)


def test_every_extension_point_has_its_builtins() -> None:
    assert {"fixed_point", "anderson", "broyden"} <= set(SOLVERS.names())
    assert {"ift", "phantom", "jfb", "broyden_reuse"} <= set(BACKWARDS.names())
    assert {"mlp_deq", "conv_deq", "explicit", "mondeq", "tied_sparse", "lyadeq"} <= set(MODELS.names())
    assert {"digits", "mnist5k", "npz"} <= set(DATASETS.names())
    assert {"iid", "dirichlet", "shards"} <= set(PARTITIONERS.names())
    assert {"residual", "budget", "val_loss", "uniform"} <= set(QUALITY.names())
    assert {"ray", "flower"} <= set(ENGINES.names())
    assert {"none", "fedeq", "fedper", "fedrep", "ditto", "local", "finetune"} <= set(PERSONALIZATION.names())


def test_a_lookup_during_the_built_ins_import_waits_for_them(tmp_path, monkeypatch) -> None:
    """A second thread asking while the home module is still importing sees the built-ins, not an empty
    registry (it waits for the import instead of taking it as done)."""
    import threading

    registry: Registry[int] = Registry("thing", home="slow_home_module")
    (tmp_path / "slow_home_module.py").write_text(
        "import time\nfrom tests.test_registry import SLOW\ntime.sleep(0.3)\nSLOW[0].register('a', 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    SLOW[:] = [registry]
    seen: list[bool] = []
    first = threading.Thread(target=lambda: seen.append("a" in registry))
    first.start()
    import time

    time.sleep(0.1)  # the first lookup is importing the home module now
    seen.append("a" in registry)
    first.join()
    assert seen == [True, True]


SLOW: list[Registry[int]] = []


def test_plugin_file_registers_once(tmp_path) -> None:
    plugin = tmp_path / "my_widgets.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from fedeq.registry import Registry
            WIDGETS = Registry("widget")
            COUNT = [0]
            COUNT[0] += 1
            """
        )
    )
    (first,) = import_plugins([str(plugin)])
    (again,) = import_plugins([str(plugin)])
    assert first is again and first.COUNT == [1]


def test_plugin_module_name_on_sys_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "fedeq_test_plugin_mod.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (module,) = import_plugins(["fedeq_test_plugin_mod"])
    assert module.VALUE == 42


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("/nonexistent/plugin.py", "no such file"),
        ("fedeq_no_such_plugin_module", "no such module"),
    ],
)
def test_missing_plugin_names_the_entry(spec: str, problem: str) -> None:
    with pytest.raises(PluginError, match=problem) as info:
        import_plugins([spec])
    assert info.value.spec == spec


def test_plugin_that_raises_reports_the_error(tmp_path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match=r"import failed \(RuntimeError: boom\)"):
        import_plugins([str(plugin)])


def test_load_object() -> None:
    assert load_object("fedeq.registry:Registry") is Registry
    assert load_object("os.path:join.__name__") == "join"
    with pytest.raises(ValueError, match="package.module:name"):
        load_object("fedeq.registry")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        load_object("fedeq.registry:Nope")


def test_public_api_resolves_every_name() -> None:
    for name in fedeq.__all__:
        assert getattr(fedeq, name) is not None, name
    with pytest.raises(AttributeError):
        fedeq.not_a_public_name  # noqa: B018
    from fedeq.deq import DEQ

    assert fedeq.DEQ is DEQ


def test_import_fedeq_is_cheap() -> None:
    code = "import sys, fedeq; print(any(m in sys.modules for m in ('torch', 'flwr', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_listed_once() -> None:
    assert fedeq.__all__ == sorted(fedeq._EXPORTS)
