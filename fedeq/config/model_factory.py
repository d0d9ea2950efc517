"""``model.name`` and ``model.kwargs``: resolving a model factory and checking its keyword options.

A model factory is called ``factory(input_shape, num_classes, cfg, **kwargs)`` (see
:class:`fedeq.models.ModelFactory`); ``model.name`` is a registered family or ``package.module:factory``,
and ``model.kwargs`` are the keyword options, checked here against the factory's signature before any
work. This module sits below :mod:`fedeq.models` in the layering, so it reaches the families through
:data:`fedeq.registry.MODELS` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedeq.config.errors import MISSING
from fedeq.config.rules import problem
from fedeq.registry import MODELS, load_object

__all__ = [
    "FACTORY_FORM",
    "FIXED_ARGUMENTS",
    "FactoryOptions",
    "check_model_kwargs",
    "check_model_name",
    "factory_options",
    "kwargs_problem",
    "model_names_allowed",
    "resolve_model_factory",
]

#: The form of ``model.name`` that names a factory outside the registry.
FACTORY_FORM = "package.module:factory"
#: The positional arguments every factory takes, in order.
FIXED_ARGUMENTS = ("input_shape", "num_classes", "cfg")


def model_names_allowed() -> str:
    """The allowed text of ``model.name``: the registered families, then the import form."""
    return f"{MODELS.allowed()} | {FACTORY_FORM}"


def resolve_model_factory(name: str) -> Callable[..., Any]:
    """The factory named by ``model.name``; ``ValueError`` saying why when there is none.

    A name with ``:`` is imported with :func:`fedeq.registry.load_object` (its module must be importable
    in every process that builds the model); any other name is looked up in :data:`~fedeq.registry.MODELS`.
    """
    if ":" not in name:
        return MODELS.get(name)
    factory = load_object(name)
    if not callable(factory):
        raise ValueError(f"{name!r} is not callable (got {type(factory).__name__})")
    return factory


@dataclass(frozen=True)
class FactoryOptions:
    """The keyword options of a factory: their names, those without a default, and whether the set is
    open (the factory takes ``**kwargs``)."""

    names: tuple[str, ...]
    required: tuple[str, ...]
    open: bool

    def allowed(self) -> str:
        """The option names for an error message (``"none"`` when the factory takes none)."""
        if self.open:
            return "any name (the factory takes **kwargs)"
        return ", ".join(self.names) if self.names else "none (the factory takes no options)"


def factory_options(factory: Callable[..., Any]) -> FactoryOptions:
    """The options of ``factory``: its parameters after the three fixed positional ones.

    Raises ``TypeError`` when ``factory`` cannot be called as ``factory(input_shape, num_classes, cfg)``.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: accept what it is given
        return FactoryOptions((), (), True)
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    if len(positional) < len(FIXED_ARGUMENTS) and not takes_varargs:
        raise TypeError(f"takes {len(positional)} positional arguments, the protocol passes 3")
    rest = [p for p in params if p not in positional[: len(FIXED_ARGUMENTS)]]
    options = [p for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    stuck = [p.name for p in rest if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if stuck:
        raise TypeError(f"needs positional-only arguments {stuck} that no config can give")
    return FactoryOptions(
        names=tuple(p.name for p in options),
        required=tuple(p.name for p in options if p.default is p.empty),
        open=any(p.kind is p.VAR_KEYWORD for p in params),
    )


def kwargs_problem(factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The first problem of ``kwargs`` for ``factory`` as ``(option, problem, allowed)``, or ``None``.

    ``option`` is the offending name (empty when the factory itself breaks the protocol).
    """
    what = getattr(factory, "__qualname__", type(factory).__name__)
    try:
        options = factory_options(factory)
    except TypeError as exc:
        protocol = f"factory({', '.join(FIXED_ARGUMENTS)}, **kwargs) -> nn.Module"
        return "", f"{what} does not follow the factory protocol ({exc})", protocol
    for key in kwargs:
        if not options.open and key not in options.names:
            return str(key), f"not an option of model factory {what}", options.allowed()
    for key in options.required:
        if key not in kwargs:
            return key, f"required by model factory {what}", options.allowed()
    return None


def check_model_name(name: str) -> None:
    """Raise a schema problem unless ``name`` resolves to a model factory."""
    if ":" not in name:
        if name not in MODELS:
            raise problem("unknown value", model_names_allowed())
        return
    try:
        resolve_model_factory(name)
    except ValueError as exc:
        raise problem(f"cannot load the model factory ({exc})", model_names_allowed()) from None


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise a schema problem at ``kwargs.<option>`` (or ``name``) when ``kwargs`` do not fit the factory."""
    found = kwargs_problem(resolve_model_factory(name), kwargs)
    if found is None:
        return
    key, what, allowed = found
    if not key:
        raise problem(what, allowed, at=("name",), got=name)
    got = kwargs[key] if key in kwargs else MISSING
    raise problem(what, allowed, at=("kwargs", key), got=got)
