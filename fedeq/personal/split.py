"""Which entries of a model's state stay on the client (its personal part) and which travel (the shared
part)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["default_personal_modules", "personal_keys", "select", "trainable_only"]


def default_personal_modules(model: nn.Module) -> list[str]:
    """The model's classifier: its last ``nn.Linear`` (``head`` of mlp_deq / explicit, ``head.7`` of
    conv_deq). A model may name its own with a ``personal_modules`` attribute."""
    declared = getattr(model, "personal_modules", None)
    if declared:
        return list(declared)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"personalization.personal_modules: {type(model).__name__} has no nn.Linear to keep on the "
            "client; name its personal modules"
        )
    return [linears[-1]]


def personal_keys(model: nn.Module, modules: Sequence[str] | None = None) -> frozenset[str]:
    """State-dict keys of the ``modules`` (default: :func:`default_personal_modules`).

    ``ValueError`` naming ``personalization.personal_modules`` for a name that is not a module of ``model``,
    or when the personal part would be the whole model.
    """
    names = list(modules) if modules else default_personal_modules(model)
    known = dict(model.named_modules())
    unknown = [n for n in names if n not in known or n == ""]
    if unknown:
        some = ", ".join(n for n in list(known)[1:12] if n)
        raise ValueError(
            f"personalization.personal_modules: {unknown} are not modules of {type(model).__name__}; "
            f"allowed: names of model.named_modules(), e.g. {some}"
        )
    keys = frozenset(
        key for key in model.state_dict() if any(key == n or key.startswith(n + ".") for n in names)
    )
    if len(keys) == len(model.state_dict()):
        raise ValueError(
            f"personalization.personal_modules: {names} hold the whole model; nothing would be shared"
        )
    return keys


def select(state: Mapping[str, Any], keys: frozenset[str], keep: bool = True) -> dict[str, Any]:
    """The entries of ``state`` whose key is in ``keys`` (``keep=False``: the others), in order."""
    return {k: v for k, v in state.items() if (k in keys) == keep}


@contextmanager
def trainable_only(model: nn.Module, keys: frozenset[str] | None) -> Iterator[list[str]]:
    """Within the block only the parameters named in ``keys`` train (``None``: all), a parameter the model
    froze staying frozen; yields their names and restores every parameter's ``requires_grad`` afterwards."""
    params = dict(model.named_parameters())
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        for name, p in params.items():
            p.requires_grad_(before[name] and (keys is None or name in keys))
        yield [name for name, p in params.items() if p.requires_grad]
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def clone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``state``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
