"""Named extension points: one small generic registry, the registries of fedeq, and plugin imports.

Every extension point (solver, backward mode, model family, dataset, partitioner, quality function,
engine) is a :class:`Registry`. A built-in is one module that registers itself with a decorator::

    from fedeq.registry import SOLVERS

    @SOLVERS.register("my_solver")
    class MySolver(Solver): ...

Config validation reads the registries, so a registered name is accepted wherever a built-in is.
Each registry knows the package (``home``) whose import registers the built-ins; it is imported on
the first lookup, which keeps this module at the bottom of the import graph.

Code outside the package reaches the registries through ``plugins``: a list of module names or
``.py`` file paths imported (by :func:`import_plugins`) before validation, in the driver and in
every process that runs an app.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar, overload

__all__ = [
    "BACKWARDS",
    "DATASETS",
    "ENGINES",
    "MODELS",
    "PARTITIONERS",
    "QUALITY",
    "SOLVERS",
    "PluginError",
    "Registry",
    "import_plugins",
    "load_object",
    "plugin_spec",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table for one extension point.

    ``kind`` names the extension point in messages ("solver"); ``home`` is the module whose import
    registers the built-ins (imported once, on the first lookup).
    """

    def __init__(self, kind: str, home: str | None = None) -> None:
        self.kind = kind
        self.home = home
        self._items: dict[str, T] = {}
        self._home_loaded = home is None
        self._lock = threading.RLock()

    def _load_home(self) -> None:
        if self._home_loaded:
            return
        with self._lock:  # another thread waits here until the built-ins are registered
            if not self._home_loaded:
                assert self.home is not None
                importlib.import_module(self.home)  # a nested lookup during the import re-enters here
                self._home_loaded = True

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator.

        Registering the same object twice is a no-op (modules may be imported again by plugins);
        a different object under a taken name raises ``ValueError``.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{self.kind} name must be an identifier (got {name!r})")

        def add(item: T) -> T:
            with self._lock:
                old = self._items.get(name)
                if old is not None and old is not item and not _same_definition(old, item):
                    raise ValueError(f"{self.kind} {name!r} is already registered ({_qualname(old)})")
                self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and interactive sessions)."""
        with self._lock:
            self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``ValueError`` listing the allowed names otherwise."""
        self._load_home()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {self.allowed()}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, built-ins first, in registration order."""
        self._load_home()
        return tuple(self._items)

    def allowed(self) -> str:
        """The names joined for an error message: ``a | b | c``."""
        return " | ".join(self.names())

    def __contains__(self, name: object) -> bool:
        self._load_home()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self._items)})"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _same_definition(old: Any, new: Any) -> bool:
    """True for the same function or class defined again (a module imported a second time)."""
    if not (hasattr(old, "__qualname__") and hasattr(new, "__qualname__")):
        return False
    return _qualname(old) == _qualname(new)


SOLVERS: Registry[Any] = Registry("solver", home="fedeq.deq.solvers")
BACKWARDS: Registry[Any] = Registry("backward mode", home="fedeq.deq.backward")
MODELS: Registry[Any] = Registry("model family", home="fedeq.models")
DATASETS: Registry[Any] = Registry("dataset", home="fedeq.data.datasets")
PARTITIONERS: Registry[Any] = Registry("partitioner", home="fedeq.data.partition")
QUALITY: Registry[Any] = Registry("quality function", home="strategies.quality")
ENGINES: Registry[Any] = Registry("engine", home="fedeq.engines")
PERSONALIZATION: Registry[Any] = Registry("personalization method", home="fedeq.personal")


# ---------------------------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------------------------


class PluginError(ValueError):
    """A plugin could not be imported; ``spec`` is the entry of ``plugins`` that failed."""

    def __init__(self, spec: str, problem: str) -> None:
        self.spec = spec
        self.problem = problem
        super().__init__(f"{spec!r}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.spec, self.problem))


_PLUGINS: dict[str, ModuleType] = {}
_PLUGIN_LOCK = threading.RLock()


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def plugin_spec(spec: str) -> str:
    """A plugin entry as :func:`import_plugins` knows it: a ``.py`` file path made absolute (against the
    current directory), a module name unchanged."""
    return str(Path(spec).expanduser().resolve()) if _is_path(spec) else spec


def _import_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise PluginError(spec, "no such file")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"fedeq_plugin_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise PluginError(spec, "not an importable Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(spec, f"import failed ({type(exc).__name__}: {exc})") from exc
    return module


def _import_module(spec: str) -> ModuleType:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and spec.startswith(exc.name):
            raise PluginError(spec, "no such module on sys.path") from exc
        raise PluginError(spec, f"import failed ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:
        raise PluginError(spec, f"import failed ({type(exc).__name__}: {exc})") from exc


def import_plugins(specs: Iterable[str] | None) -> list[ModuleType]:
    """Import each plugin once per process: a module name (``my_pkg.cells``) or a ``.py`` file path.

    A file is imported under a name derived from its absolute path, so two files with the same stem
    do not collide. Raises :class:`PluginError` naming the entry that failed.
    """
    modules = []
    for spec in specs or ():
        if not isinstance(spec, str) or not spec.strip():
            raise PluginError(str(spec), "expected a module name or a .py file path")
        key = plugin_spec(spec)
        with _PLUGIN_LOCK:
            module = _PLUGINS.get(key)
            if module is None:
                module = _import_file(spec) if _is_path(spec) else _import_module(spec)
                _PLUGINS[key] = module
        modules.append(module)
    return modules


def load_object(target: str) -> Any:
    """Resolve ``"package.module:attribute"`` (``attribute`` may be dotted); ``ValueError`` if not found."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected package.module:name (got {target!r})")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj
