"""What the subcommands that take a run config share: the ``[CONFIG.yaml] [key=value ...]`` arguments and
the checks a config must pass before any work starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedeq.config import ConfigError

if TYPE_CHECKING:
    from fedeq.data import DatasetSplits

__all__ = ["check_model", "check_runnable", "split_config_args"]


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest must be key=value overrides."""
    path: str | None = None
    overrides: list[str] = []
    for i, arg in enumerate(args):
        if "=" in arg:
            overrides.append(arg)
        elif i == 0:
            path = arg
        else:
            raise ConfigError(
                "overrides", "expected key=value", "key=value after an optional CONFIG.yaml", arg
            )
    return path, overrides


def check_runnable(cfg: Any) -> None:
    """Checks that need the registries (strategy name and kwargs), the data (the dataset's own check, its
    contents and the partition over clients) and the model (built once from ``model.*``), still before any
    work."""
    from fedeq.data import check_data
    from fedeq.server.app import strategy_for

    report = check_data(cfg, warn=False)
    check_model(cfg, report.splits)
    strategy_for(cfg)
    report.warn()  # after every check: an invalid config prints its error line alone


def check_model(cfg: Any, splits: DatasetSplits) -> None:
    """Build the model once on the shapes of ``splits`` (the dataset :func:`fedeq.data.check_data` loaded):
    a factory that refuses its options (a value out of its range in ``model.kwargs``, say) becomes a
    :class:`ConfigError` naming the key, before any work."""
    from fedeq.models import build_model

    try:
        model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        kwargs = dict(cfg.model.kwargs or {})
        key, got = ("model.kwargs", kwargs) if kwargs else ("model.name", cfg.model.name)
        problem = (
            f"the model factory refused its options ({type(exc).__name__}: {' '.join(str(exc).split())})"
        )
        raise ConfigError(key, problem, "options the model factory accepts", got) from None
    check_personal_modules(cfg, model)
    if getattr(cfg.train, "intermediate_states", False):
        from fedeq.train.intermediate import check_intermediate_states

        try:
            check_intermediate_states(model)
        except ValueError:
            allowed = (
                "false, or true with a model exposing its equilibrium map "
                "(mlp_deq, conv_deq, lyadeq, potential_deq)"
            )
            raise ConfigError(
                "train.intermediate_states", f"not supported by model {cfg.model.name!r}", allowed, True
            ) from None


def check_personal_modules(cfg: Any, model: Any) -> None:
    """``personalization.personal_modules`` must name modules of the model that leave something shared
    (for the methods that keep a personal head), else a :class:`ConfigError` naming the key."""
    from fedeq.personal import get_method, personal_keys

    settings = cfg.personalization
    if get_method(settings.method).shares != "body":
        return
    try:
        personal_keys(model, settings.personal_modules)
    except ValueError as exc:
        problem = str(exc).split(": ", 1)[-1].split("; allowed: ")[0]
        allowed = str(exc).split("; allowed: ")[-1] if "; allowed: " in str(exc) else "modules of the model"
        raise ConfigError(
            "personalization.personal_modules", problem, allowed, settings.personal_modules
        ) from None
